// mimalloc instead of glibc's malloc: see docs/ARCHITECTURE.md ("Memory allocator").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    billcl_host::cli::main()
}
