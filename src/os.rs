//! The one module that calls OS APIs directly (hence the one allowed
//! `unsafe`): attaching to the console a command was started from (Windows),
//! and hearing when the agent is asked to stop (SIGTERM, SIGINT, SIGHUP on
//! Unix; Ctrl-C, Ctrl-Break, the console window closing, log-off and
//! shutdown on Windows), and starting the processes of a handover.

#![allow(unsafe_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long the watcher waits for the loop to stop before it stops the
/// process itself (Windows gives a closing console about 5 s).
const STOP_GRACE: Duration = Duration::from_secs(3);

/// Names of the stop requests; `STOP` holds the index + 1 of the one heard.
const REASONS: [&str; 9] = [
    "SIGTERM",
    "SIGINT (Ctrl-C)",
    "SIGHUP (terminal closed)",
    "Ctrl-C",
    "Ctrl-Break",
    "the console window closing",
    "Windows log-off",
    "Windows shutdown",
    "a close request (taskkill)",
];

/// 0 until a stop is requested, then 1 + the index in `REASONS`.
static STOP: AtomicUsize = AtomicUsize::new(0);

/// Set once the loop has finished stopping; the watcher waits on it.
static STOPPED: (Mutex<bool>, Condvar) = (Mutex::new(false), Condvar::new());

/// Wakes the loop when a stop is requested (set by [`watch_stop`]).
static WAKE: OnceLock<Box<dyn Fn() + Send + Sync>> = OnceLock::new();

/// Why a stop was requested, once one was.
pub fn stop_requested() -> Option<&'static str> {
    match STOP.load(Ordering::SeqCst) {
        0 => None,
        n => REASONS.get(n - 1).copied(),
    }
}

/// Sleeps for `d`, or less if a stop is requested meanwhile.
pub fn sleep(d: Duration) {
    let until = Instant::now() + d;
    let mut stopped = STOPPED.0.lock().unwrap_or_else(|e| e.into_inner());
    while stop_requested().is_none() {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        stopped = STOPPED
            .1
            .wait_timeout(stopped, left)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

/// The loop has finished stopping: the watcher (and a closing Windows
/// console) may let the process end.
pub fn stopped() {
    *STOPPED.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
    STOPPED.1.notify_all();
}

/// Records a stop request, wakes the loop, and waits (bounded) for it to
/// finish; past the grace time the process ends here, after a log line.
fn on_stop(reason: usize) {
    if STOP
        .compare_exchange(0, reason + 1, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        // A second request while stopping: the user insists.
        log::warn!("{} again while stopping: exiting now", REASONS[reason]);
        std::process::exit(1);
    }
    // Under the lock, so a `sleep` between its check and its wait cannot miss it.
    drop(STOPPED.0.lock().unwrap_or_else(|e| e.into_inner()));
    STOPPED.1.notify_all();
    if let Some(wake) = WAKE.get() {
        wake();
    }
    let deadline = Instant::now() + STOP_GRACE;
    let mut stopped = STOPPED.0.lock().unwrap_or_else(|e| e.into_inner());
    while !*stopped {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            log::warn!(
                "stopping on {}: the loop did not finish within {} s; exiting now",
                REASONS[reason],
                STOP_GRACE.as_secs()
            );
            std::process::exit(0);
        }
        stopped = STOPPED
            .1
            .wait_timeout(stopped, left)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

/// What wakes the loop when a stop is requested (it may be blocked waiting
/// for MQTT); runs on another thread. Set once.
pub fn on_stop_wake(wake: impl Fn() + Send + Sync + 'static) {
    let _ = WAKE.set(Box::new(wake));
}

/// Starts hearing stop requests. On Unix this must run before any other
/// thread starts: the signals are blocked in this thread and every later
/// one, and taken by a thread of their own.
#[cfg(unix)]
pub fn watch_stop() {
    let signals = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];
    // SAFETY: `set` is a plain sigset_t that sigemptyset initialises before
    // any other use; pthread_sigmask and sigwait only read it.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in signals {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let watcher = std::thread::Builder::new()
        .name("holosync-stop".into())
        .spawn(move || loop {
            let mut sig = 0;
            // SAFETY: `set` lives in this closure; `sig` is a valid out pointer.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                if let Some(i) = signals.iter().position(|&s| s == sig) {
                    on_stop(i);
                }
            }
        });
    if let Err(e) = watcher {
        log::warn!("could not start the stop-signal thread ({e}); a stop will not be logged");
    }
}

/// Starts hearing stop requests: console events (Ctrl-C, Ctrl-Break, the
/// console closing) when a console is attached, and log-off and shutdown
/// through a hidden window, which every process with a window is sent
/// (Windows gives those to console handlers only in processes without
/// user32, and a kiosk started from the Startup folder has no console).
#[cfg(windows)]
pub fn watch_stop() {
    use windows_sys::Win32::System::Console::SetConsoleCtrlHandler;
    // SAFETY: `console_event` has the signature Windows expects and stays
    // valid for the life of the process.
    unsafe {
        SetConsoleCtrlHandler(Some(console_event), 1);
    }
    let watcher = std::thread::Builder::new()
        .name("holosync-session".into())
        .spawn(session_window);
    if let Err(e) = watcher {
        log::warn!(
            "could not start the log-off watcher thread ({e}); a log-off will not be logged"
        );
    }
}

/// Runs on a thread Windows starts for each console event.
#[cfg(windows)]
unsafe extern "system" fn console_event(event: u32) -> windows_sys::core::BOOL {
    use windows_sys::Win32::System::Console::{CTRL_BREAK_EVENT, CTRL_CLOSE_EVENT, CTRL_C_EVENT};
    let reason = match event {
        CTRL_C_EVENT => 3,
        CTRL_BREAK_EVENT => 4,
        CTRL_CLOSE_EVENT => 5,
        // Log-off and shutdown come to the hidden window instead.
        _ => return 0,
    };
    on_stop(reason);
    1
}

/// Tries at creating the log-off watcher's window, [`WINDOW_RETRY`] apart.
#[cfg(windows)]
const WINDOW_ATTEMPTS: u32 = 20;

/// Pause between two tries at creating the window.
#[cfg(windows)]
const WINDOW_RETRY: Duration = Duration::from_millis(500);

/// Creates a hidden top-level window (a message-only window is not sent
/// session messages) and serves its messages until the process ends.
#[cfg(windows)]
fn session_window() {
    use windows_sys::Win32::System::LibraryLoader::GetModuleHandleW;
    use windows_sys::Win32::UI::WindowsAndMessaging::{
        CreateWindowExW, DispatchMessageW, GetMessageW, RegisterClassW, MSG, WNDCLASSW,
        WS_OVERLAPPED,
    };
    let class: Vec<u16> = "holosync-session\0".encode_utf16().collect();
    // SAFETY: every pointer passed points to a live, NUL-terminated or
    // zero-initialised value of the type the call expects; the class name
    // outlives the window (this function never returns while it exists).
    unsafe {
        let instance = GetModuleHandleW(std::ptr::null());
        let mut wc: WNDCLASSW = std::mem::zeroed();
        wc.lpfnWndProc = Some(session_message);
        wc.hInstance = instance;
        wc.lpszClassName = class.as_ptr();
        if RegisterClassW(&wc) == 0 {
            let e = std::io::Error::last_os_error();
            log::warn!("could not register the log-off watcher's window class ({e}); a log-off will not be logged");
            return;
        }
        // The first window of a new session (a freshly made Wine prefix, a
        // desktop still starting) can fail: try for a while before giving up.
        for attempt in 1..=WINDOW_ATTEMPTS {
            let window = CreateWindowExW(
                0,
                class.as_ptr(),
                class.as_ptr(),
                WS_OVERLAPPED,
                0,
                0,
                0,
                0,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                instance,
                std::ptr::null(),
            );
            if !window.is_null() {
                break;
            }
            let e = std::io::Error::last_os_error();
            if attempt == WINDOW_ATTEMPTS {
                log::warn!(
                    "could not create the log-off watcher's window ({e}, {WINDOW_ATTEMPTS} tries); a log-off will not be logged"
                );
                return;
            }
            log::debug!("could not create the log-off watcher's window yet ({e}); trying again");
            std::thread::sleep(WINDOW_RETRY);
        }
        log::debug!("the log-off watcher's window is ready");
        let mut msg: MSG = std::mem::zeroed();
        while GetMessageW(&mut msg, std::ptr::null_mut(), 0, 0) > 0 {
            DispatchMessageW(&msg);
        }
    }
}

/// The hidden window's messages: agree to end the session, and stop cleanly
/// (bounded by the grace time) before Windows ends the process.
#[cfg(windows)]
unsafe extern "system" fn session_message(
    window: windows_sys::Win32::Foundation::HWND,
    msg: u32,
    wparam: windows_sys::Win32::Foundation::WPARAM,
    lparam: windows_sys::Win32::Foundation::LPARAM,
) -> windows_sys::Win32::Foundation::LRESULT {
    use windows_sys::Win32::UI::WindowsAndMessaging::{
        DefWindowProcW, ENDSESSION_LOGOFF, WM_CLOSE, WM_ENDSESSION, WM_QUERYENDSESSION,
    };
    match msg {
        WM_QUERYENDSESSION => 1,
        // `taskkill /IM holosync.exe` (without /F) asks each window of the
        // process to close: the clean stop of a windowless program.
        WM_CLOSE => {
            on_stop(8);
            0
        }
        WM_ENDSESSION => {
            if wparam != 0 {
                let logoff = (lparam as u32) & ENDSESSION_LOGOFF != 0;
                on_stop(if logoff { 6 } else { 7 });
            }
            0
        }
        // SAFETY: the arguments are the ones Windows passed in.
        _ => unsafe { DefWindowProcW(window, msg, wparam, lparam) },
    }
}

/// Renames `from` over `to` and returns once the rename is on the disk:
/// the folder is synced after it.
#[cfg(unix)]
pub fn rename_durably(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    std::fs::rename(from, to)?;
    let folder = to.parent().unwrap_or(std::path::Path::new("."));
    std::fs::File::open(folder)?.sync_all()
}

/// Renames `from` over `to` and returns once the rename is on the disk:
/// `MoveFileExW` with `MOVEFILE_WRITE_THROUGH` (`std::fs::rename` passes
/// only `MOVEFILE_REPLACE_EXISTING`, which NTFS logs lazily).
#[cfg(windows)]
pub fn rename_durably(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    use std::os::windows::ffi::OsStrExt;
    use windows_sys::Win32::Storage::FileSystem::{
        MoveFileExW, MOVEFILE_REPLACE_EXISTING, MOVEFILE_WRITE_THROUGH,
    };
    let wide =
        |p: &std::path::Path| -> Vec<u16> { p.as_os_str().encode_wide().chain([0]).collect() };
    let (from, to) = (wide(from), wide(to));
    // SAFETY: both are NUL-terminated UTF-16 paths that outlive the call.
    let ok = unsafe {
        MoveFileExW(
            from.as_ptr(),
            to.as_ptr(),
            MOVEFILE_REPLACE_EXISTING | MOVEFILE_WRITE_THROUGH,
        )
    };
    if ok == 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Free bytes (for an unprivileged user) on the disk holding `path`.
#[cfg(unix)]
pub fn free_bytes(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: `c` is a valid NUL-terminated path and `st` a plain struct
    // that statvfs fills in; nothing is kept past the call.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return None;
        }
        Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
    }
}

/// Free bytes (for this user) on the disk holding `path`.
#[cfg(windows)]
pub fn free_bytes(path: &std::path::Path) -> Option<u64> {
    use std::os::windows::ffi::OsStrExt;
    use windows_sys::Win32::Storage::FileSystem::GetDiskFreeSpaceExW;
    let wide: Vec<u16> = path.as_os_str().encode_wide().chain([0]).collect();
    let mut free = 0u64;
    // SAFETY: `wide` is NUL-terminated; the out pointer is a valid u64; the
    // other outputs may be null.
    let ok = unsafe {
        GetDiskFreeSpaceExW(
            wide.as_ptr(),
            &mut free,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    };
    (ok != 0).then_some(free)
}

/// CPU time the calling thread has used (for the benchmark's per-phase
/// split; zero where there is no cheap per-thread clock).
#[cfg(unix)]
pub fn thread_cpu() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant
    // every supported kernel knows.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return std::time::Duration::ZERO;
    }
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// CPU time the calling thread has used: not measured on Windows (only the
/// benchmark, which runs on Linux, uses it).
#[cfg(not(unix))]
pub fn thread_cpu() -> std::time::Duration {
    std::time::Duration::ZERO
}

/// Attaches to the parent process's console when stdout has no handle of
/// its own (a GUI-subsystem program started from a command prompt).
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

/// The user's proxy settings from Internet Options (HKCU), as `requests`
/// and most Windows programs read them; None where there are none.
#[cfg(windows)]
pub fn windows_proxy_settings() -> Option<crate::proxy::WindowsSettings> {
    use windows_sys::Win32::System::Registry::{
        RegGetValueW, HKEY_CURRENT_USER, RRF_RT_REG_DWORD, RRF_RT_REG_SZ,
    };
    let wide = |s: &str| s.encode_utf16().chain([0]).collect::<Vec<u16>>();
    let key = wide(r"Software\Microsoft\Windows\CurrentVersion\Internet Settings");
    let dword = |name: &str| -> Option<u32> {
        let name = wide(name);
        let mut value = 0u32;
        let mut size = std::mem::size_of::<u32>() as u32;
        // SAFETY: the key and name are NUL-terminated UTF-16; value and size
        // point to a u32 and its size, as RRF_RT_REG_DWORD needs.
        let r = unsafe {
            RegGetValueW(
                HKEY_CURRENT_USER,
                key.as_ptr(),
                name.as_ptr(),
                RRF_RT_REG_DWORD,
                std::ptr::null_mut(),
                (&mut value as *mut u32).cast(),
                &mut size,
            )
        };
        (r == 0).then_some(value)
    };
    let string = |name: &str| -> Option<String> {
        let name = wide(name);
        let mut buf = vec![0u16; 4096];
        let mut size = (buf.len() * 2) as u32;
        // SAFETY: as above; buf has `size` bytes, and RegGetValueW
        // NUL-terminates what it writes there (RRF_RT_REG_SZ).
        let r = unsafe {
            RegGetValueW(
                HKEY_CURRENT_USER,
                key.as_ptr(),
                name.as_ptr(),
                RRF_RT_REG_SZ,
                std::ptr::null_mut(),
                buf.as_mut_ptr().cast(),
                &mut size,
            )
        };
        if r != 0 {
            return None;
        }
        let len = buf.iter().position(|&c| c == 0).unwrap_or(buf.len());
        Some(String::from_utf16_lossy(&buf[..len]))
    };
    let enable = dword("ProxyEnable")?;
    Some(crate::proxy::WindowsSettings {
        enable: enable != 0,
        server: string("ProxyServer"),
        bypass: string("ProxyOverride"),
    })
}

/// No Internet Options outside Windows.
#[cfg(not(windows))]
pub fn windows_proxy_settings() -> Option<crate::proxy::WindowsSettings> {
    None
}

/// A process started by [`spawn`] (a supervisor, an agent on trial).
#[cfg(unix)]
pub struct Process(std::process::Child);

/// A process started by [`spawn`] (a supervisor, an agent on trial): its
/// handle, closed on drop.
#[cfg(windows)]
pub struct Process(windows_sys::Win32::Foundation::HANDLE);

/// Starts `program` with `args`, its standard input and output nowhere.
#[cfg(unix)]
pub fn spawn(program: &std::path::Path, args: &[&std::ffi::OsStr]) -> std::io::Result<Process> {
    use std::process::Stdio;
    std::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(Process)
}

/// Starts `program` with `args` by `CreateProcessW`, inheriting no handle.
/// Not by `std::process::Command`: its environment and pipe machinery cost
/// the 32-bit kiosk exe about 16 KB, and a supervisor needs none of it.
#[cfg(windows)]
pub fn spawn(program: &std::path::Path, args: &[&std::ffi::OsStr]) -> std::io::Result<Process> {
    use std::os::windows::ffi::OsStrExt;
    use windows_sys::Win32::Foundation::CloseHandle;
    use windows_sys::Win32::System::Threading::{
        CreateProcessW, PROCESS_INFORMATION, STARTUPINFOW,
    };
    let mut line = Vec::new();
    quote_arg(program.as_os_str(), &mut line);
    for a in args {
        line.push(u16::from(b' '));
        quote_arg(a, &mut line);
    }
    line.push(0);
    let app: Vec<u16> = program.as_os_str().encode_wide().chain([0]).collect();
    let startup = STARTUPINFOW {
        cb: std::mem::size_of::<STARTUPINFOW>() as u32,
        ..Default::default()
    };
    let mut info = PROCESS_INFORMATION::default();
    // SAFETY: `app` and `line` are NUL-terminated UTF-16 buffers that live
    // across the call (`line` is writable, as CreateProcessW wants); the
    // structs are initialised; null pointers mean the documented defaults.
    let ok = unsafe {
        CreateProcessW(
            app.as_ptr(),
            line.as_mut_ptr(),
            std::ptr::null(),
            std::ptr::null(),
            0,
            0,
            std::ptr::null(),
            std::ptr::null(),
            &startup,
            &mut info,
        )
    };
    if ok == 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a handle CreateProcessW returned, closed once.
    unsafe { CloseHandle(info.hThread) };
    Ok(Process(info.hProcess))
}

/// Appends `arg` to a command line as the C runtime splits it again:
/// quoted when it has a space, tab or quote (or is empty), backslashes
/// doubled before a quote.
#[cfg(windows)]
fn quote_arg(arg: &std::ffi::OsStr, out: &mut Vec<u16>) {
    use std::os::windows::ffi::OsStrExt;
    let (quote, backslash) = (u16::from(b'"'), u16::from(b'\\'));
    let wide: Vec<u16> = arg.encode_wide().collect();
    if !wide.is_empty() && !wide.iter().any(|&c| c == 32 || c == 9 || c == quote) {
        out.extend(wide);
        return;
    }
    out.push(quote);
    let mut backslashes = 0;
    for c in wide {
        if c == backslash {
            backslashes += 1;
        } else {
            if c == quote {
                out.extend(std::iter::repeat_n(backslash, backslashes + 1));
            }
            backslashes = 0;
        }
        out.push(c);
    }
    out.extend(std::iter::repeat_n(backslash, backslashes));
    out.push(quote);
}

#[cfg(unix)]
impl Process {
    /// How it ended, if it has.
    pub fn try_wait(&mut self) -> std::io::Result<Option<String>> {
        Ok(self.0.try_wait()?.map(|s| s.to_string()))
    }

    /// Kills it and waits for it to be gone.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[cfg(windows)]
impl Process {
    /// How it ended, if it has.
    pub fn try_wait(&mut self) -> std::io::Result<Option<String>> {
        use windows_sys::Win32::Foundation::WAIT_OBJECT_0;
        use windows_sys::Win32::System::Threading::{GetExitCodeProcess, WaitForSingleObject};
        // SAFETY: the handle is ours and open until drop.
        if unsafe { WaitForSingleObject(self.0, 0) } != WAIT_OBJECT_0 {
            return Ok(None);
        }
        let mut code = 0u32;
        // SAFETY: as above; `code` is a valid out pointer.
        if unsafe { GetExitCodeProcess(self.0, &mut code) } == 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Some(format!("exit code {code}")))
    }

    /// Kills it and waits (up to 10 s) for it to be gone.
    pub fn kill(&mut self) {
        use windows_sys::Win32::System::Threading::{TerminateProcess, WaitForSingleObject};
        // SAFETY: the handle is ours and open until drop.
        unsafe {
            TerminateProcess(self.0, 1);
            WaitForSingleObject(self.0, 10_000);
        }
    }
}

#[cfg(windows)]
impl Drop for Process {
    fn drop(&mut self) {
        // SAFETY: the handle is ours, closed once here.
        unsafe { windows_sys::Win32::Foundation::CloseHandle(self.0) };
    }
}
