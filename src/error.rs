//! One error type for everything the caller does not branch on: a sentence that
//! names the resource, plus the cause it came from.

use std::fmt;

/// An error with context: "could not open queue database C:\kiosk\holosync.db".
#[derive(Debug)]
pub struct Error {
    /// What was being done, naming the thing it was done to.
    context: String,
    /// The lower-level error that caused it, if any.
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// Result with holosync's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error with no underlying cause.
    pub fn msg(context: impl Into<String>) -> Error {
        Error {
            context: context.into(),
            source: None,
        }
    }

    /// An error with context and the cause it came from.
    pub fn new(
        context: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Error {
        Error {
            context: context.into(),
            source: Some(Box::new(source)),
        }
    }

    /// The message and all causes, joined with ": " (for one log line).
    pub fn chain(&self) -> String {
        let mut out = self.context.clone();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            out.push_str(": ");
            out.push_str(&c.to_string());
            cause = c.source();
        }
        out
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.context)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Adds context to any error, in the manner of `anyhow::Context`.
pub trait Context<T> {
    /// Wraps the error with a sentence built only if there is an error.
    fn context<C: Into<String>>(self, f: impl FnOnce() -> C) -> Result<T>;
}

impl<T, E> Context<T> for std::result::Result<T, E>
where
    E: std::error::Error + Send + Sync + 'static,
{
    fn context<C: Into<String>>(self, f: impl FnOnce() -> C) -> Result<T> {
        self.map_err(|e| Error::new(f(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_joins_every_cause() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let err = Err::<(), _>(io)
            .context(|| "could not open queue database /k/holosync.db")
            .unwrap_err();
        assert_eq!(
            err.chain(),
            "could not open queue database /k/holosync.db: no such file"
        );
    }
}
