//! The build script every guest crate shares (`build = "../guest-build.rs"`).
//!
//! A smaller wasm stack: Rust's wasm32 default is 1 MiB, placed at the start of linear
//! memory, so every instance's memory starts at 1 MiB + data and the host resets all of it
//! when a fresh command instance ends. The procedures here need a few KiB of stack; 64 KiB
//! leaves a wide margin and makes the memory a fresh instance starts with ~8 times smaller.
//! A guest that overflows it traps, as with any stack size.

/// The guest's stack, in bytes.
const GUEST_STACK_BYTES: u32 = 64 * 1024;

fn main() {
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("wasm32") {
        println!("cargo:rustc-link-arg=-zstack-size={GUEST_STACK_BYTES}");
    }
    println!("cargo:rerun-if-changed=../guest-build.rs");
}
