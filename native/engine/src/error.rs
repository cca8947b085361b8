//! One error type for the whole engine, sorted into the few kinds a caller acts on.
//!
//! mls-rs reports ~130 distinct failures. Callers (the Python client session and the
//! delivery service) only need to know *what to do*: drop a malformed message, re-sync
//! after an epoch mismatch, reject an invalid handshake, or fix their own call sequence.
//! The mls-rs variant name is kept as `code` for logs and tests.

use std::fmt;

use mls_rs::error::MlsError;

/// What went wrong, at the granularity a caller can act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The bytes are not a well-formed MLS structure of the expected type.
    Decode,
    /// A well-formed message for an epoch other than the group's current one.
    Epoch,
    /// A well-formed message that fails validation (signature, tags, tree, proposal rules,
    /// identity, membership).
    Validation,
    /// The call does not fit the object's state (no pending commit, removed from group, ...).
    State,
    /// A cipher suite or protocol version this build does not support.
    Unsupported,
    /// A caller-supplied argument is out of range (not input from the network).
    InvalidArgument,
    /// A failure inside mls-rs or a crypto provider that is not the caller's fault.
    Internal,
}

/// An engine failure: a kind, the mls-rs variant name (`code`) and a human message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    pub kind: ErrorKind,
    pub code: String,
    pub message: String,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(kind: ErrorKind, code: &str, message: impl Into<String>) -> Self {
        Self {
            kind,
            code: code.to_owned(),
            message: message.into(),
        }
    }

    pub fn decode(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Decode, "Decode", message)
    }

    pub fn state(code: &str, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::State, code, message)
    }

    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, "InvalidArgument", message)
    }

    pub fn validation(code: &str, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Validation, code, message)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

impl std::error::Error for Error {}

/// The variant name of an mls-rs error, without its payload.
fn variant_name(err: &MlsError) -> String {
    let debug = format!("{err:?}");
    debug
        .split(|c: char| !c.is_ascii_alphanumeric())
        .next()
        .unwrap_or("MlsError")
        .to_owned()
}

fn kind_of(err: &MlsError) -> ErrorKind {
    use MlsError::*;
    match err {
        SerializationError(_) | UnexpectedMessageType | ExtensionError(_) => ErrorKind::Decode,
        InvalidEpoch | EpochNotFound | OldGroupStateNotFound => ErrorKind::Epoch,
        UnsupportedCipherSuite(_)
        | UnsupportedProtocolVersion(_)
        | CipherSuiteMismatch
        | ProtocolVersionMismatch => ErrorKind::Unsupported,
        ExistingPendingCommit
        | PendingCommitNotFound
        | CantProcessMessageFromSelf
        | GroupUsedAfterReInit
        | ExporterDeleted
        | SignerNotFound
        | WelcomeKeyPackageNotFound
        | GroupNotFound
        | CommitRequired
        | SelfRemoveAlreadyProposed => ErrorKind::State,
        // HPKE opens and signature checks fail on bad input: a validation failure
        CryptoProviderError(_) => ErrorKind::Validation,
        KeyPackageRepoError(_)
        | GroupStorageError(_)
        | PskStoreError(_)
        | MlsRulesError(_)
        | FailedGeneratingPathSecret
        | TimeOverflow => ErrorKind::Internal,
        _ => ErrorKind::Validation,
    }
}

impl From<MlsError> for Error {
    fn from(err: MlsError) -> Self {
        if let MlsError::IdentityProviderError(inner) = &err {
            // a credential refused by our identity provider: its own error says why
            if let Some(rejected) = inner
                .inner_dyn_error()
                .downcast_ref::<crate::config::IdentityRejected>()
            {
                return rejected.0.clone();
            }
        }
        Self {
            kind: kind_of(&err),
            code: variant_name(&err),
            message: err.to_string(),
        }
    }
}

impl From<mls_rs::mls_rs_codec::Error> for Error {
    fn from(err: mls_rs::mls_rs_codec::Error) -> Self {
        Self::decode(err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variant_names_drop_payloads() {
        assert_eq!(variant_name(&MlsError::InvalidEpoch), "InvalidEpoch");
        assert_eq!(variant_name(&MlsError::LeafNotFound(7)), "LeafNotFound");
        assert_eq!(Error::from(MlsError::InvalidEpoch).kind, ErrorKind::Epoch);
        assert_eq!(
            Error::from(MlsError::InvalidSignature).kind,
            ErrorKind::Validation
        );
    }
}
