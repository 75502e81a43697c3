fn main() -> std::process::ExitCode {
    billcl_host::cli::main()
}
