//! Windows only: the agent is a GUI-subsystem program (no console window at
//! start-up), so the technician's commands attach to the console they were
//! started from to print their output. The one module that calls an OS API.

#![allow(unsafe_code)]

/// Attaches to the parent process's console when stdout has no handle of its own.
#[cfg(windows)]
pub fn attach_parent_console() {
    use windows_sys::Win32::Foundation::INVALID_HANDLE_VALUE;
    use windows_sys::Win32::System::Console::{
        AttachConsole, GetStdHandle, ATTACH_PARENT_PROCESS, STD_OUTPUT_HANDLE,
    };
    // SAFETY: both calls take plain values and have no memory-safety
    // preconditions; a failure (no parent console) just leaves output unseen.
    unsafe {
        let out = GetStdHandle(STD_OUTPUT_HANDLE);
        if out.is_null() || out == INVALID_HANDLE_VALUE {
            AttachConsole(ATTACH_PARENT_PROCESS);
        }
    }
}

/// Elsewhere a program always has its terminal: nothing to do.
#[cfg(not(windows))]
pub fn attach_parent_console() {}
