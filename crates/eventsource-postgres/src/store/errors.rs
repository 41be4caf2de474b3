//! How sqlx errors become store errors: the one place they are classified.

use eventsource_core::ErrorKind;
use eventsource_core::store::StoreError;

pub(crate) fn backend(e: sqlx::Error) -> StoreError {
    match sqlx_error_kind(&e) {
        ErrorKind::Unavailable => StoreError::ConnectionLost {
            operation: "a store operation",
            source: Box::new(e),
        },
        ErrorKind::Timeout => StoreError::Timeout(match &e {
            sqlx::Error::Database(db) => db.message().to_owned(),
            _ => "no database connection became free in time".into(),
        }),
        _ => StoreError::Backend(Box::new(e)),
    }
}

/// SQLSTATEs sqlx's `DatabaseError::kind()` does not classify (it covers the constraint
/// violations only).
mod sqlstate {
    /// lock_not_available (`lock_timeout`).
    pub(super) const LOCK_NOT_AVAILABLE: &str = "55P03";
    /// query_canceled (`statement_timeout`).
    pub(super) const QUERY_CANCELED: &str = "57014";
    /// Class 08, connection exception.
    pub(super) const CONNECTION_EXCEPTION_CLASS: &str = "08";
    /// admin_shutdown, crash_shutdown, cannot_connect_now: the server ends or refuses the
    /// session.
    pub(super) const SERVER_GOING_AWAY: [&str; 3] = ["57P01", "57P02", "57P03"];
    /// Class 28, invalid authorization specification (a wrong password, an unknown role).
    pub(super) const INVALID_AUTHORIZATION_CLASS: &str = "28";
    /// insufficient_privilege (a missing grant).
    pub(super) const INSUFFICIENT_PRIVILEGE: &str = "42501";
    /// too_many_connections: passes when other clients disconnect.
    pub(super) const TOO_MANY_CONNECTIONS: &str = "53300";
    /// Class 53, insufficient resources (disk full, out of memory).
    pub(super) const INSUFFICIENT_RESOURCES_CLASS: &str = "53";
    /// serialization_failure, deadlock_detected: retry the transaction.
    pub(super) const RETRY_TRANSACTION: [&str; 2] = ["40001", "40P01"];
}

/// The one place a sqlx error is classified: constraint violations through sqlx's
/// `DatabaseError::kind()`, the rest by SQLSTATE class (see `sqlstate`) and sqlx's variants.
/// A pool the application closed is `InvalidState`: retrying cannot help.
pub(crate) fn sqlx_error_kind(e: &sqlx::Error) -> ErrorKind {
    use sqlx::error::ErrorKind as Db;
    match e {
        sqlx::Error::Io(_) | sqlx::Error::WorkerCrashed => ErrorKind::Unavailable,
        sqlx::Error::PoolTimedOut => ErrorKind::Timeout,
        sqlx::Error::PoolClosed => ErrorKind::InvalidState,
        sqlx::Error::Configuration(_) | sqlx::Error::Tls(_) => ErrorKind::Config,
        sqlx::Error::Protocol(_) => ErrorKind::Protocol,
        sqlx::Error::RowNotFound => ErrorKind::NotFound,
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => ErrorKind::InvalidData,
        sqlx::Error::Database(db) => match db.kind() {
            Db::UniqueViolation => ErrorKind::AlreadyExists,
            Db::ForeignKeyViolation | Db::NotNullViolation | Db::CheckViolation => {
                ErrorKind::InvalidInput
            }
            _ => {
                let code = db.code().unwrap_or_default();
                let code = code.as_ref();
                if code.starts_with(sqlstate::CONNECTION_EXCEPTION_CLASS)
                    || sqlstate::SERVER_GOING_AWAY.contains(&code)
                    || code == sqlstate::TOO_MANY_CONNECTIONS
                {
                    ErrorKind::Unavailable
                } else if code == sqlstate::LOCK_NOT_AVAILABLE || code == sqlstate::QUERY_CANCELED {
                    ErrorKind::Timeout
                } else if code.starts_with(sqlstate::INVALID_AUTHORIZATION_CLASS) {
                    ErrorKind::Authentication
                } else if code == sqlstate::INSUFFICIENT_PRIVILEGE {
                    ErrorKind::Permission
                } else if code.starts_with(sqlstate::INSUFFICIENT_RESOURCES_CLASS) {
                    ErrorKind::ResourceExhausted
                } else if sqlstate::RETRY_TRANSACTION.contains(&code) {
                    ErrorKind::Conflict
                } else {
                    ErrorKind::Other
                }
            }
        },
        _ => ErrorKind::Other,
    }
}
