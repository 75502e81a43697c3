//! The procedure catalog as routers, the CLI and SDK users hold it, and the one rule that
//! finds the procedure a call names.
//!
//! The Procedures request lists every deployed version's procedures, `active` marking the
//! version a call runs unless it pins another. A call names `NAME` (the active version) or
//! `NAME@VERSION`: the procedure `NAME` of the module whose active version exports it, at that
//! version. Its arguments are checked against that version's own signature, so an old version
//! whose parameters differ stays callable pinned. The storages resolve calls by the same rule.

use std::borrow::Borrow;
use std::fmt;

use crate::message::ProcedureInfo;
use crate::value::Value;

/// Most procedure names an unknown-procedure error lists (the rest are counted).
pub const LISTED_NAMES_MAX: usize = 32;

/// Why a catalog holds no procedure for a call's name and version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LookupError {
    /// No active module version exports the name.
    UnknownProcedure {
        /// The name as the call gave it.
        name: String,
        /// The names an unpinned call may use, sorted.
        callable: Vec<String>,
    },
    /// The module exporting the name has no such version, or that version does not export it.
    UnknownVersion {
        /// The kebab-case procedure name.
        name: String,
        module: String,
        version: u32,
        /// The module's versions that export the name, ascending.
        versions: Vec<u32>,
        /// The module's active version.
        active: u32,
    },
}

impl fmt::Display for LookupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LookupError::UnknownProcedure { name, callable } if callable.is_empty() => write!(
                f,
                "no procedure `{name}`: no module is deployed (`billcl deploy MODULE.wasm`)"
            ),
            LookupError::UnknownProcedure { name, callable } => {
                let shown = callable.len().min(LISTED_NAMES_MAX);
                write!(
                    f,
                    "no procedure `{name}`; callable procedures: {}",
                    callable[..shown].join(", ")
                )?;
                if callable.len() > shown {
                    write!(f, " and {} more", callable.len() - shown)?;
                }
                write!(f, " (`billcl procedures` shows their signatures)")
            }
            LookupError::UnknownVersion {
                name,
                module,
                version,
                versions,
                active,
            } => {
                let listed: Vec<String> = versions.iter().map(u32::to_string).collect();
                write!(
                    f,
                    "no version {version} of `{name}`: module {module} has `{name}` in \
                     version{} {} ({active} is active); call `{name}@VERSION` with one of them, \
                     or `{name}` for the active one",
                    if versions.len() == 1 { "" } else { "s" },
                    listed.join(", ")
                )
            }
        }
    }
}

impl std::error::Error for LookupError {}

/// Splits `add_money@3` into the name and the pinned version (`None` without `@`).
pub fn split_pinned(text: &str) -> Result<(&str, Option<u32>), String> {
    match text.split_once('@') {
        None => Ok((text, None)),
        Some((name, version)) => match version.parse::<u32>() {
            Ok(version) if !name.is_empty() => Ok((name, Some(version))),
            _ => Err(format!(
                "`{text}`: write NAME or NAME@VERSION with a version number, e.g. `add_money@1`"
            )),
        },
    }
}

/// The procedure a call names: `name` (`add_money` or `add-money`) of the module whose active
/// version exports it, at `version` (`None`: the active one).
pub fn find_procedure<'a, P: Borrow<ProcedureInfo>>(
    catalog: &'a [P],
    name: &str,
    version: Option<u32>,
) -> Result<&'a P, LookupError> {
    let infos = || catalog.iter().map(|entry| (entry, entry.borrow()));
    let Some((active_entry, active)) =
        infos().find(|(_, info)| info.active && same_name(&info.name, name))
    else {
        let mut callable: Vec<String> = infos()
            .filter(|(_, info)| info.active)
            .map(|(_, info)| info.name.clone())
            .collect();
        callable.sort();
        callable.dedup();
        return Err(LookupError::UnknownProcedure {
            name: name.to_string(),
            callable,
        });
    };
    let Some(version) = version.filter(|&version| version != active.version) else {
        return Ok(active_entry);
    };
    let same =
        |(_, info): &(&P, &ProcedureInfo)| info.module == active.module && info.name == active.name;
    if let Some((pinned, _)) = infos()
        .filter(same)
        .find(|(_, info)| info.version == version)
    {
        return Ok(pinned);
    }
    let mut versions: Vec<u32> = infos().filter(same).map(|(_, info)| info.version).collect();
    versions.sort_unstable();
    versions.dedup();
    Err(LookupError::UnknownVersion {
        name: active.name.clone(),
        module: active.module.clone(),
        version,
        versions,
        active: active.version,
    })
}

/// Whether a catalog name (kebab-case) is the name a call gives (`add_money` or
/// `add-money`), without building the kebab-case form of the call's.
fn same_name(catalog_name: &str, called: &str) -> bool {
    catalog_name.len() == called.len()
        && catalog_name
            .bytes()
            .zip(called.bytes())
            .all(|(a, b)| a == if b == b'_' { b'-' } else { b })
}

impl ProcedureInfo {
    /// How a call of this entry is written: `add-money` for the active version, `add-money@1`
    /// for another.
    pub fn call_name(&self) -> String {
        if self.active {
            self.name.clone()
        } else {
            format!("{}@{}", self.name, self.version)
        }
    }

    /// Whether `args` fit the parameters (count and types); the error names the parameter and
    /// the expected type, or shows the signature when the count is wrong.
    pub fn check_args(&self, args: &[Value]) -> Result<(), String> {
        if args.len() != self.params.len() {
            return Err(format!(
                "{} takes {} argument(s), got {}: {}",
                self.call_name(),
                self.params.len(),
                args.len(),
                self.signature()
            ));
        }
        for ((param, ty), arg) in self.params.iter().zip(args) {
            arg.check(ty).map_err(|message| {
                format!("{}: parameter `{param}`: {message}", self.call_name())
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::ProcedureKind;
    use crate::value::Type;

    fn entry(
        name: &str,
        module: &str,
        version: u32,
        active: bool,
        params: &[Type],
    ) -> ProcedureInfo {
        ProcedureInfo {
            name: name.into(),
            module: module.into(),
            version,
            active,
            kind: ProcedureKind::Command,
            params: params
                .iter()
                .enumerate()
                .map(|(i, ty)| (format!("p{i}"), ty.clone()))
                .collect(),
            result: Some(Type::U32),
        }
    }

    /// `f` of module `m`: v1 `f(p0: u64, p1: bool)`, v2 (active) `f(p0: u64, p1: string)`,
    /// v3 without `f`; `g` of module `n` whose v1 exported `f` before `m` did.
    fn catalog() -> Vec<ProcedureInfo> {
        vec![
            entry("f", "m", 2, true, &[Type::U64, Type::String]),
            entry("add-money", "billing", 1, true, &[Type::U64, Type::Decimal]),
            entry("f", "m", 1, false, &[Type::U64, Type::Bool]),
            entry("f", "n", 1, false, &[Type::U64]),
            entry("g", "m", 3, false, &[Type::U64]),
        ]
    }

    #[test]
    fn an_unpinned_call_finds_the_active_version() {
        let catalog = catalog();
        let found = find_procedure(&catalog, "f", None).unwrap();
        assert_eq!((found.module.as_str(), found.version), ("m", 2));
        assert_eq!(find_procedure(&catalog, "f", Some(2)).unwrap(), found);
        let money = find_procedure(&catalog, "add_money", None).unwrap();
        assert_eq!(money.name, "add-money");
    }

    #[test]
    fn a_pinned_call_finds_that_version_of_the_active_module() {
        let catalog = catalog();
        let pinned = find_procedure(&catalog, "f", Some(1)).unwrap();
        assert_eq!((pinned.module.as_str(), pinned.version), ("m", 1));
        assert_eq!(pinned.params[1].1, Type::Bool, "v1's own signature");
        assert_eq!(pinned.call_name(), "f@1");
        assert!(pinned
            .check_args(&[Value::Uint(4), Value::Bool(true)])
            .is_ok());
        let error = pinned
            .check_args(&[Value::Uint(4), Value::String("x".into())])
            .unwrap_err();
        assert!(
            error.starts_with("f@1: parameter `p1`: expected bool"),
            "{error}"
        );
        let error = pinned.check_args(&[Value::Uint(4)]).unwrap_err();
        assert_eq!(
            error,
            "f@1 takes 2 argument(s), got 1: f(p0: u64, p1: bool) -> u32"
        );
    }

    #[test]
    fn an_unknown_version_lists_the_versions_that_exist() {
        let catalog = catalog();
        let error = find_procedure(&catalog, "f", Some(9)).unwrap_err();
        assert_eq!(
            error,
            LookupError::UnknownVersion {
                name: "f".into(),
                module: "m".into(),
                version: 9,
                versions: vec![1, 2],
                active: 2,
            }
        );
        assert_eq!(
            error.to_string(),
            "no version 9 of `f`: module m has `f` in versions 1, 2 (2 is active); call \
             `f@VERSION` with one of them, or `f` for the active one"
        );
        // Version 3 of `m` exists but has no `f`.
        assert!(matches!(
            find_procedure(&catalog, "f", Some(3)),
            Err(LookupError::UnknownVersion { version: 3, .. })
        ));
    }

    #[test]
    fn only_active_versions_make_a_name_callable() {
        let catalog = catalog();
        let error = find_procedure(&catalog, "g", Some(3)).unwrap_err();
        assert_eq!(
            error.to_string(),
            "no procedure `g`; callable procedures: add-money, f (`billcl procedures` shows \
             their signatures)"
        );
        let error = find_procedure::<ProcedureInfo>(&[], "get", None).unwrap_err();
        assert!(
            error.to_string().contains("no module is deployed"),
            "{error}"
        );
    }

    #[test]
    fn pinned_names_split() {
        assert_eq!(split_pinned("add_money@3"), Ok(("add_money", Some(3))));
        assert_eq!(split_pinned("get"), Ok(("get", None)));
        for bad in ["get@", "get@x", "@2", "get@-1"] {
            let error = split_pinned(bad).unwrap_err();
            assert!(error.contains("NAME@VERSION"), "{bad}: {error}");
        }
    }
}
