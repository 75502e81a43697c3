use std::ffi::{c_int, c_long};

// mimalloc instead of glibc's malloc: see docs/ARCHITECTURE.md ("Memory allocator").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in the mimalloc (v3) that libmimalloc-sys 0.1.49 builds: mimalloc
/// is pinned (`=0.1.52` in Cargo.toml, libmimalloc-sys 0.1.49 in Cargo.lock), so the value
/// does not move under us.
const MI_OPTION_PURGE_DELAY: c_int = 15;

extern "C" {
    fn mi_option_set(option: c_int, value: c_long);
}

fn main() -> std::process::ExitCode {
    // No transparent huge pages in this process: mimalloc asks for them on its arenas
    // (`MADV_HUGEPAGE`), and the first touch of each 2 MiB page then zeroes it whole inside a
    // page fault, 0.5 ms and more on a virtual machine; a leader that grew a buffer for a
    // learner's append stalled its async worker for 5-10 ms that way, several times a second,
    // and every call waiting on it with it (docs/performance-history.md, "Huge pages"). The
    // flag holds for every mapping of the process, advised or not, whatever the system's THP
    // setting.
    // SAFETY: a plain process attribute; failure (an old kernel) leaves THP as it was.
    unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    // Freed memory stays with the process for reuse instead of going back to the OS 10 ms
    // later: a node's footprint is its working set plus a snapshot's buffer either way, and
    // handing pages back only to fault them in again cost 5 % of a write's CPU and raised
    // its tail (docs/performance-history.md). `MIMALLOC_PURGE_DELAY` in the environment
    // overrides it.
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets a plain option before any thread is started; any value is valid.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
    billcl_host::cli::main()
}
