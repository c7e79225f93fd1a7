//! The holosync executable: everything happens in `holosync::cli::main`.

fn main() -> std::process::ExitCode {
    holosync::cli::main()
}
