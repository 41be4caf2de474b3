//! A stable classification shared by every error type of the workspace.
//!
//! Each error type (`StoreError`, `BusError`, `RepositoryError`, the Redis bus's and the
//! PostgreSQL store's errors) has a `kind()` returning an [`ErrorKind`] and an
//! `is_transient()` saying whether the same call may succeed later, so a caller decides on a
//! retry without matching variants or downcasting a boxed cause (sqlx's `ErrorKind` and
//! `std::io::ErrorKind` are the models). The cause stays available through
//! [`std::error::Error::source`].

/// What kind of failure an error is. Stable: new kinds may be added (match with a wildcard
/// arm), existing ones keep their meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The configuration is invalid; the error names the option. Fix it and restart.
    Config,
    /// The server could not be reached or the connection dropped. Transient: retry with
    /// backoff. For a write, its outcome may be unknown (the error says so).
    Unavailable,
    /// The operation did not finish in time (a timeout, a lock wait, no free connection).
    /// Transient: retry with backoff.
    Timeout,
    /// The server refused the credentials. Fix the user or password.
    Authentication,
    /// The user may not run the operation (a Redis ACL, a PostgreSQL grant). Grant it.
    Permission,
    /// The server refuses writes until an operator acts (Redis `OOM`, `MISCONF`: memory or
    /// disk). Retrying helps only after the operator did.
    ResourceExhausted,
    /// Another writer got there first (optimistic concurrency). Reload and retry the command.
    Conflict,
    /// What is being written already exists (an event id stored before: often a retried write
    /// that had succeeded).
    AlreadyExists,
    /// The request was refused: the named thing does not exist.
    NotFound,
    /// The input is invalid (an event, an argument, a business rule). Retrying the same input
    /// cannot help.
    InvalidInput,
    /// Stored or received data does not decode (corrupt, or written by an incompatible
    /// version).
    InvalidData,
    /// The peer answered something this library does not understand (a bug or an
    /// incompatible server).
    Protocol,
    /// The call does not fit the current state (for example consuming twice).
    InvalidState,
    /// Anything else; the message and `source()` say more.
    Other,
}

impl ErrorKind {
    /// Whether an error of this kind may pass by itself, so the same call may succeed later:
    /// [`Unavailable`](Self::Unavailable) and [`Timeout`](Self::Timeout).
    pub fn is_transient(self) -> bool {
        matches!(self, Self::Unavailable | Self::Timeout)
    }

    /// A short stable name (`"unavailable"`, `"timeout"`, ...), for logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Config => "config",
            Self::Unavailable => "unavailable",
            Self::Timeout => "timeout",
            Self::Authentication => "authentication",
            Self::Permission => "permission",
            Self::ResourceExhausted => "resource_exhausted",
            Self::Conflict => "conflict",
            Self::AlreadyExists => "already_exists",
            Self::NotFound => "not_found",
            Self::InvalidInput => "invalid_input",
            Self::InvalidData => "invalid_data",
            Self::Protocol => "protocol",
            Self::InvalidState => "invalid_state",
            Self::Other => "other",
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::ErrorKind::*;

    #[test]
    fn only_unavailable_and_timeout_are_transient_and_names_are_distinct() {
        let all = [
            Config,
            Unavailable,
            Timeout,
            Authentication,
            Permission,
            ResourceExhausted,
            Conflict,
            AlreadyExists,
            NotFound,
            InvalidInput,
            InvalidData,
            Protocol,
            InvalidState,
            Other,
        ];
        let transient: Vec<_> = all.iter().filter(|k| k.is_transient()).collect();
        assert_eq!(transient, [&Unavailable, &Timeout]);
        let names: std::collections::BTreeSet<_> = all.iter().map(|k| k.as_str()).collect();
        assert_eq!(names.len(), all.len());
        assert_eq!(Timeout.to_string(), "timeout");
    }
}
