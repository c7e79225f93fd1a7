//! The holosync executable: everything happens in `holosync::cli::main`.

// No console window on a kiosk; the technician's commands attach to theirs.
#![cfg_attr(windows, windows_subsystem = "windows")]

fn main() -> std::process::ExitCode {
    holosync::cli::main()
}
