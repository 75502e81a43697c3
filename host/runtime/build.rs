//! Builds the guest procedure crates under `procedures/` (every crate there but `money`, a plain
//! library) into wasm components, so that `cargo build` is the only command a developer runs.
//!
//! Each guest is compiled for `wasm32-unknown-unknown` by Debian's `rustc-web` toolchain (std built
//! from source with `-Zbuild-std`), in its own target directory beside the outer one so the inner
//! cargo never waits on the outer cargo's lock. The core module it produces carries wit-bindgen's
//! component-type section; `wit-component` turns it into a component, written to
//! `$OUT_DIR/<crate dir>.component.wasm` (`billing.component.wasm`, `transfer.component.wasm`,
//! …); the core module is kept beside it as `<crate dir>.core.wasm`. Every guest but the
//! built-in `billing` is an example module, listed in `$OUT_DIR/examples.rs` (the runtime's
//! `EXAMPLE_COMPONENTS`).

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

/// Debian's wasm-capable toolchain, called by absolute path so rustup's shims never interfere.
const GUEST_CARGO: &str = "/usr/bin/cargo";
const GUEST_RUSTC: &str = "/usr/bin/rustc";
const GUEST_LINKER: &str = "wasm-ld-19";
const GUEST_STD_SOURCE: &str = "/usr/lib/rustlib/src/rust/library";
const GUEST_TARGET: &str = "wasm32-unknown-unknown";
const INSTALL_HINT: &str = "apt-get install -y rustc-web cargo-web rust-web-src lld-19";
/// Crates under procedures/ that are libraries shared with the host, not guests.
const NOT_GUESTS: [&str; 1] = ["money"];
/// The built-in module's directory: every other guest is an example module.
const BUILT_IN_GUEST: &str = "billing";
/// Outer build variables the inner cargo may keep (everything else named CARGO*/RUST* goes).
const KEPT_VARIABLES: [&str; 3] = ["CARGO_HOME", "RUSTUP_HOME", "CARGO_MAKEFLAGS"];

fn main() -> ExitCode {
    match build_guests() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: building the wasm guest procedures failed\n{message}");
            ExitCode::FAILURE
        }
    }
}

fn build_guests() -> Result<(), String> {
    let manifest_dir = PathBuf::from(env_var("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(env_var("OUT_DIR")?);
    let workspace = manifest_dir
        .ancestors()
        .nth(2)
        .ok_or("host/runtime has no workspace two levels up")?
        .to_path_buf();
    let procedures = workspace.join("procedures");
    let target_dir = outer_target_dir(&out_dir)
        .unwrap_or_else(|| workspace.join("target"))
        .join("wasm-guests");

    println!("cargo:rerun-if-changed={}", workspace.join("wit").display());
    // A new guest crate under procedures/ is picked up too.
    println!("cargo:rerun-if-changed={}", procedures.display());
    println!(
        "cargo:rerun-if-changed={}",
        procedures.join("money/src").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        procedures.join("money/Cargo.toml").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        procedures.join("guest-build.rs").display()
    );

    check_toolchain()?;

    let guests = guest_crates(&procedures)?;
    if !guests.iter().any(|guest| guest.ends_with("billing")) {
        return Err(format!(
            "no procedures/billing guest crate under {}",
            procedures.display()
        ));
    }
    let mut examples = Vec::new();
    for guest in guests {
        let (name, component_path) = build_guest(&guest, &target_dir, &out_dir)?;
        if name != BUILT_IN_GUEST {
            examples.push((name, component_path));
        }
    }
    write_examples(&examples, &out_dir.join("examples.rs"))?;
    let core_modules: Vec<(String, PathBuf)> = examples
        .iter()
        .map(|(name, _)| (name.clone(), out_dir.join(format!("{name}.core.wasm"))))
        .collect();
    write_examples(&core_modules, &out_dir.join("example_core_modules.rs"))
}

/// A slice expression of `(directory name, wasm bytes)` for every example guest, written to
/// `path` (`examples.rs`: components, the runtime's `EXAMPLE_COMPONENTS`;
/// `example_core_modules.rs`: their core modules, `EXAMPLE_CORE_MODULES`).
fn write_examples(examples: &[(String, PathBuf)], path: &Path) -> Result<(), String> {
    let mut text = String::from("&[\n");
    for (name, path) in examples {
        text.push_str(&format!(
            "    ({name:?}, include_bytes!({:?})),\n",
            path.display()
        ));
    }
    text.push_str("]\n");
    fs::write(path, text).map_err(|error| format!("cannot write {}: {error}", path.display()))
}

fn env_var(name: &str) -> Result<String, String> {
    env::var(name).map_err(|_| format!("{name} is not set (is this run by cargo?)"))
}

/// The outer build's target directory: the nearest ancestor of OUT_DIR that cargo marked with
/// CACHEDIR.TAG (`<target>/release/build/<pkg>/out` or `<target>/<triple>/release/...`).
fn outer_target_dir(out_dir: &Path) -> Option<PathBuf> {
    out_dir
        .ancestors()
        .find(|dir| dir.join("CACHEDIR.TAG").is_file())
        .map(Path::to_path_buf)
}

fn check_toolchain() -> Result<(), String> {
    let mut missing = Vec::new();
    for path in [GUEST_CARGO, GUEST_RUSTC, GUEST_STD_SOURCE] {
        if !Path::new(path).exists() {
            missing.push(path.to_string());
        }
    }
    if find_on_path(GUEST_LINKER).is_none() {
        missing.push(GUEST_LINKER.to_string());
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the guest toolchain is missing ({}); install it with:\n    {INSTALL_HINT}",
            missing.join(", ")
        ))
    }
}

fn find_on_path(program: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// Every directory of `procedures/` holding a Cargo.toml, except the shared libraries.
fn guest_crates(procedures: &Path) -> Result<Vec<PathBuf>, String> {
    let entries = fs::read_dir(procedures)
        .map_err(|error| format!("cannot list {}: {error}", procedures.display()))?;
    let mut guests = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|error| format!("cannot list {}: {error}", procedures.display()))?
            .path();
        let is_shared = path
            .file_name()
            .and_then(|name| name.to_str())
            .is_some_and(|name| NOT_GUESTS.contains(&name));
        if path.join("Cargo.toml").is_file() && !is_shared {
            guests.push(path);
        }
    }
    guests.sort();
    Ok(guests)
}

/// The `name` of the `[package]` table, read without a TOML parser (the manifest is ours).
fn package_name(manifest: &str) -> Option<String> {
    let mut in_package = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_package = line == "[package]";
        } else if in_package {
            if let Some(value) = line.strip_prefix("name") {
                let value = value.trim_start().strip_prefix('=')?.trim();
                return Some(value.trim_matches('"').to_string());
            }
        }
    }
    None
}

/// Builds one guest; returns its directory name and the path of its component.
fn build_guest(
    guest: &Path,
    target_dir: &Path,
    out_dir: &Path,
) -> Result<(String, PathBuf), String> {
    for watched in ["src", "wit", "Cargo.toml", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", guest.join(watched).display());
    }
    let manifest_path = guest.join("Cargo.toml");
    let manifest = fs::read_to_string(&manifest_path)
        .map_err(|error| format!("cannot read {}: {error}", manifest_path.display()))?;
    let crate_name = package_name(&manifest)
        .ok_or_else(|| format!("{} has no [package] name", manifest_path.display()))?;
    let directory_name = guest
        .file_name()
        .and_then(|name| name.to_str())
        .ok_or_else(|| format!("{} is not a UTF-8 directory name", guest.display()))?;

    let mut command = Command::new(GUEST_CARGO);
    for (name, _) in env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        let is_build_variable = name.starts_with("CARGO") || name.starts_with("RUST");
        if is_build_variable && !KEPT_VARIABLES.contains(&name) {
            command.env_remove(name);
        }
    }
    command
        .current_dir(guest)
        .env("RUSTC", GUEST_RUSTC)
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_LINKER", GUEST_LINKER)
        .args(["build", "--release", "--locked", "--target", GUEST_TARGET])
        .arg("-Zbuild-std=std,panic_abort")
        .arg("--target-dir")
        .arg(target_dir);
    let output = command
        .output()
        .map_err(|error| format!("cannot run {GUEST_CARGO}: {error}\n    {INSTALL_HINT}"))?;
    if !output.status.success() {
        return Err(format!(
            "`{GUEST_CARGO} build` of {} exited with {}:\n{}",
            guest.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }

    let module_path = target_dir
        .join(GUEST_TARGET)
        .join("release")
        .join(format!("{}.wasm", crate_name.replace('-', "_")));
    let module = fs::read(&module_path)
        .map_err(|error| format!("cannot read {}: {error}", module_path.display()))?;
    let component = wit_component::ComponentEncoder::default()
        .module(&module)
        .and_then(|encoder| encoder.validate(true).encode())
        .map_err(|error| format!("cannot componentize {}: {error:#}", module_path.display()))?;
    // The core module too, so tests can check that `Runtime::load` componentizes one itself.
    let core_path = out_dir.join(format!("{directory_name}.core.wasm"));
    fs::write(&core_path, &module)
        .map_err(|error| format!("cannot write {}: {error}", core_path.display()))?;
    let component_path = out_dir.join(format!("{directory_name}.component.wasm"));
    fs::write(&component_path, component)
        .map_err(|error| format!("cannot write {}: {error}", component_path.display()))?;
    Ok((directory_name.to_string(), component_path))
}
