//! Edits of the cluster file made by the verbs that change the cluster while it runs
//! (`billcl voters`, `billcl expel`), so that the file keeps describing it. Only the lines an
//! edit is about change: comments, order and layout stay. The edited text is checked as a
//! cluster file before it replaces the file (written aside, then renamed over it), so a file
//! the edit cannot understand is left as it was.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};

use crate::config::ClusterConfig;

/// What to do to one instance's section.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct InstanceEdit {
    /// Take the whole section out (the comment lines after its last key stay: they usually
    /// introduce the next section).
    pub remove: bool,
    /// `key = value` lines to set: an existing line for the key is replaced, else the line is
    /// added after the section's last key.
    pub set: Vec<(&'static str, String)>,
}

impl InstanceEdit {
    pub(crate) fn remove() -> Self {
        InstanceEdit {
            remove: true,
            set: Vec::new(),
        }
    }

    pub(crate) fn set(key: &'static str, value: String) -> Self {
        InstanceEdit {
            remove: false,
            set: vec![(key, value)],
        }
    }
}

/// Applies `edits` (instance name → edit) to the instances of `replicaset` in the cluster
/// file at `path`.
pub(crate) fn edit_instances(
    path: &Path,
    replicaset: &str,
    edits: &BTreeMap<String, InstanceEdit>,
) -> Result<()> {
    let (out, missing) = edited_file(path, replicaset, edits)?;
    // A section written another way (quoted keys, an inline table) is not found: say so
    // rather than report an edit that did not happen.
    if let Some(missing) = missing {
        anyhow::bail!(
            "{} has no line `[replicasets.{replicaset}.instances.{missing}]` to edit (it is \
             unchanged): edit it by hand",
            path.display()
        );
    }
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, out)
        .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    if let Err(e) = ClusterConfig::load(&tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.context(format!(
            "{} could not be edited (it is unchanged): edit it by hand",
            path.display()
        )));
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))?;
    // The rename itself made durable, as the members' own files are.
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|dir| dir.sync_all())
            .with_context(|| format!("cannot sync {}", dir.display()))?;
    }
    Ok(())
}

/// Whether [`edit_instances`] can edit the sections of `names` in `replicaset`: what a verb
/// checks before it changes the cluster, so that it does not stop half way on the file.
pub(crate) fn check_editable(path: &Path, replicaset: &str, names: &[String]) -> Result<()> {
    let edits: BTreeMap<String, InstanceEdit> = names
        .iter()
        .map(|name| (name.clone(), InstanceEdit::default()))
        .collect();
    if let (_, Some(missing)) = edited_file(path, replicaset, &edits)? {
        anyhow::bail!(
            "{} has no line `[replicasets.{replicaset}.instances.{missing}]` for this verb to \
             edit (written another way?): write the section that way, then run it again; \
             nothing was changed",
            path.display()
        );
    }
    Ok(())
}

/// Sets the `voter` line of each instance named in `flags`.
pub(crate) fn set_voters(path: &Path, replicaset: &str, flags: &[(String, bool)]) -> Result<()> {
    let edits = flags
        .iter()
        .map(|(name, voter)| (name.clone(), InstanceEdit::set("voter", voter.to_string())))
        .collect();
    edit_instances(path, replicaset, &edits)
}

/// The file at `path` with `edits` made, and the first instance of `edits` whose section it
/// has not (as `[replicasets.R.instances.M]`).
fn edited_file(
    path: &Path,
    replicaset: &str,
    edits: &BTreeMap<String, InstanceEdit>,
) -> Result<(String, Option<String>)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let (out, found) = edited(&text, replicaset, edits);
    let missing = edits.keys().find(|name| !found.contains(*name)).cloned();
    Ok((out, missing))
}

fn is_header(line: &str) -> bool {
    line.trim_start().starts_with('[')
}

/// Whether `line` holds a key (not blank, not a comment).
fn is_content(line: &str) -> bool {
    let line = line.trim_start();
    !line.is_empty() && !line.starts_with('#')
}

/// The key a `key = value` line sets.
fn key_of(line: &str) -> Option<&str> {
    let (key, _) = line.split_once('=')?;
    Some(key.trim())
}

/// The text with `edits` made, and the names whose section it found.
fn edited(
    text: &str,
    replicaset: &str,
    edits: &BTreeMap<String, InstanceEdit>,
) -> (String, std::collections::BTreeSet<String>) {
    let lines: Vec<&str> = text.lines().collect();
    let mut out: Vec<String> = Vec::with_capacity(lines.len() + 4);
    let mut found = std::collections::BTreeSet::new();
    let edit_of = |header: &str| {
        edits.iter().find(|(name, _)| {
            header.trim() == format!("[replicasets.{replicaset}.instances.{name}]")
        })
    };
    let mut at = 0;
    while at < lines.len() {
        let Some((name, edit)) = is_header(lines[at]).then(|| edit_of(lines[at])).flatten() else {
            out.push(lines[at].to_string());
            at += 1;
            continue;
        };
        found.insert(name.clone());
        let end = (at + 1..lines.len())
            .find(|&i| is_header(lines[i]))
            .unwrap_or(lines.len());
        // The section's keys end at its last content line; what follows is kept as it is.
        let keys_end = (at + 1..end)
            .rev()
            .find(|&i| is_content(lines[i]))
            .map_or(at + 1, |i| i + 1);
        let mut trailing = &lines[keys_end..end];
        if edit.remove {
            // Not two blank lines where the section was.
            let blank_before = out.last().is_none_or(|line| line.trim().is_empty());
            while blank_before && trailing.first().is_some_and(|line| line.trim().is_empty()) {
                trailing = &trailing[1..];
            }
        } else {
            out.push(lines[at].to_string());
            let mut unset: Vec<&(&str, String)> = edit.set.iter().collect();
            for line in &lines[at + 1..keys_end] {
                let set = key_of(line)
                    .filter(|_| is_content(line))
                    .and_then(|key| unset.iter().position(|(k, _)| *k == key));
                match set {
                    Some(index) => {
                        let (key, value) = unset.remove(index);
                        out.push(format!("{key} = {value}"));
                    }
                    None => out.push(line.to_string()),
                }
            }
            out.extend(unset.iter().map(|(key, value)| format!("{key} = {value}")));
        }
        out.extend(trailing.iter().map(|line| line.to_string()));
        at = end;
    }
    let mut text = out.join("\n");
    text.push('\n');
    (text, found)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str =
        "# top\n[cluster]\nbucket_count = 10\n[routers.r]\naddress = \"127.0.0.1:4000\"\n\n\
        [replicasets.a]\n\n\
        [replicasets.a.instances.a-1]\naddress = \"127.0.0.1:4001\"\nvoter = true # first\n\n\
        [replicasets.a.instances.a-2]\naddress = \"127.0.0.1:4002\"\n\n\
        # b: the second replicaset\n\
        [replicasets.b.instances.a-3]\naddress = \"127.0.0.1:4003\"\nvoter = true\n";

    fn edit(remove: bool, set: &[(&'static str, &str)]) -> InstanceEdit {
        InstanceEdit {
            remove,
            set: set.iter().map(|(k, v)| (*k, v.to_string())).collect(),
        }
    }

    #[test]
    fn set_voters_rewrites_only_the_voter_lines_of_the_replicaset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.toml");
        std::fs::write(&path, FILE).unwrap();
        set_voters(&path, "a", &[("a-2".into(), true), ("a-1".into(), false)]).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            FILE.replace("voter = true # first", "voter = false")
                .replace("4002\"\n", "4002\"\nvoter = true\n")
        );
        // a-3 of another replicaset is not a-3 of `a`: refused, nothing changes.
        let before = std::fs::read_to_string(&path).unwrap();
        let error = set_voters(&path, "a", &[("a-3".into(), false)]).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("has no line `[replicasets.a.instances.a-3]` to edit"),
            "{error}"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), before);
    }

    #[test]
    fn a_removed_section_goes_with_its_keys_and_leaves_the_next_sections_comment() {
        let edits = BTreeMap::from([
            ("a-2".to_string(), edit(true, &[])),
            ("a-1".to_string(), edit(false, &[("node_id", "1")])),
        ]);
        assert_eq!(
            edited(FILE, "a", &edits).0,
            "# top\n[cluster]\nbucket_count = 10\n[routers.r]\naddress = \"127.0.0.1:4000\"\n\n\
             [replicasets.a]\n\n\
             [replicasets.a.instances.a-1]\naddress = \"127.0.0.1:4001\"\n\
             voter = true # first\nnode_id = 1\n\n\
             # b: the second replicaset\n\
             [replicasets.b.instances.a-3]\naddress = \"127.0.0.1:4003\"\nvoter = true\n"
        );
        // The last section, removed: nothing of it is left.
        let edits = BTreeMap::from([("a-3".to_string(), edit(true, &[]))]);
        let (text, found) = edited(FILE, "b", &edits);
        assert!(found.contains("a-3"), "{found:?}");
        assert!(text.ends_with("# b: the second replicaset\n"), "{text}");
    }

    #[test]
    fn a_section_written_another_way_is_named_before_anything_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.toml");
        let quoted = FILE.replace(
            "[replicasets.a.instances.a-2]",
            "[replicasets.a.instances.\"a-2\"]",
        );
        std::fs::write(&path, &quoted).unwrap();
        check_editable(&path, "a", &["a-1".to_string()]).unwrap();
        let error = check_editable(&path, "a", &["a-1".into(), "a-2".into()]).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("no line `[replicasets.a.instances.a-2]` for this verb to edit"),
            "{error}"
        );
        let error = set_voters(&path, "a", &[("a-2".into(), true)]).unwrap_err();
        assert!(
            error.to_string().contains("to edit (it is unchanged)"),
            "{error}"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), quoted);
    }

    #[test]
    fn an_edit_that_would_leave_an_invalid_file_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.toml");
        std::fs::write(&path, FILE).unwrap();
        let edits = BTreeMap::from([(
            "a-2".to_string(),
            edit(false, &[("address", "\"127.0.0.1:4003\"")]),
        )]);
        let error = edit_instances(&path, "a", &edits).unwrap_err();
        let error = format!("{error:#}");
        assert!(
            error.contains("could not be edited (it is unchanged)")
                && error.contains("have the same address 127.0.0.1:4003"),
            "{error}"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), FILE);
        assert!(!path.with_extension("toml.tmp").exists());
    }
}
