//! `mls_provider._mls`: the Python face of the MLS engine.
//!
//! Thin by design: every method converts arguments, releases the GIL around the engine
//! call, and maps engine errors to the `MlsError` exception hierarchy. Panics (which the
//! engine should never raise) are caught and reported as `InternalError` rather than
//! unwinding into the interpreter.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, MutexGuard};

use mls_engine as engine;
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyTuple;

create_exception!(
    _mls,
    MlsError,
    PyException,
    "Base class of every MLS failure."
);
create_exception!(
    _mls,
    DecodeError,
    MlsError,
    "The bytes are not a well-formed MLS structure of the expected type."
);
create_exception!(
    _mls,
    EpochError,
    MlsError,
    "A message for an epoch other than the group's current one."
);
create_exception!(
    _mls,
    ValidationError,
    MlsError,
    "A well-formed message that fails MLS validation."
);
create_exception!(
    _mls,
    StateError,
    MlsError,
    "The call does not fit the object's state."
);
create_exception!(
    _mls,
    UnsupportedError,
    MlsError,
    "A cipher suite or protocol version this build does not support."
);
create_exception!(
    _mls,
    InternalError,
    MlsError,
    "A failure inside the MLS engine that is not the caller's fault."
);

fn to_py_err(err: engine::Error) -> PyErr {
    let message = err.to_string();
    let py_err = match err.kind {
        engine::ErrorKind::Decode => DecodeError::new_err(message),
        engine::ErrorKind::Epoch => EpochError::new_err(message),
        engine::ErrorKind::Validation => ValidationError::new_err(message),
        engine::ErrorKind::State => StateError::new_err(message),
        engine::ErrorKind::Unsupported => UnsupportedError::new_err(message),
        engine::ErrorKind::InvalidArgument => return PyValueError::new_err(err.message),
        engine::ErrorKind::Internal => InternalError::new_err(message),
    };
    Python::attach(|py| {
        // `code` names the mls-rs failure, for logs and tests.
        let _ = py_err.value(py).setattr("code", err.code);
    });
    py_err
}

/// Runs `f` without the GIL, turning engine errors and panics into Python exceptions.
fn run<T, F>(py: Python<'_>, f: F) -> PyResult<T>
where
    T: Send,
    F: FnOnce() -> engine::Result<T> + Send,
{
    let outcome = py.detach(|| catch_unwind(AssertUnwindSafe(f)));
    match outcome {
        Ok(result) => result.map_err(to_py_err),
        Err(_) => Err(to_py_err(engine::Error::new(
            engine::ErrorKind::Internal,
            "Panic",
            "the MLS engine panicked; the object may be unusable",
        ))),
    }
}

/// Locks a mutex even if a caught panic poisoned it (state is replaced atomically by
/// mls-rs, so a poisoned group is still consistent).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---------------------------------------------------------------------------------------
// Value types

/// A group member: leaf index, LiveKit identity and signature public key.
#[pyclass(module = "mls_provider._mls", frozen, eq, get_all)]
#[derive(Clone, PartialEq)]
struct Member {
    leaf_index: u32,
    identity: String,
    signature_key: Vec<u8>,
    not_after: Option<u64>,
}

#[pymethods]
impl Member {
    fn __repr__(&self) -> String {
        format!(
            "Member(leaf_index={}, identity={:?})",
            self.leaf_index, self.identity
        )
    }
}

impl From<engine::Member> for Member {
    fn from(m: engine::Member) -> Self {
        Self {
            leaf_index: m.leaf_index,
            identity: m.identity,
            signature_key: m.signature_key,
            not_after: m.not_after,
        }
    }
}

/// The messages one commit produces.
#[pyclass(module = "mls_provider._mls", frozen, get_all)]
struct CommitOutput {
    commit: Vec<u8>,
    welcome: Option<Vec<u8>>,
    group_info: Option<Vec<u8>>,
    left_out: Vec<String>,
}

#[pymethods]
impl CommitOutput {
    fn __repr__(&self) -> String {
        format!(
            "CommitOutput(commit=<{} bytes>, welcome={}, group_info={})",
            self.commit.len(),
            self.welcome
                .as_ref()
                .map_or("None".into(), |w| format!("<{} bytes>", w.len())),
            self.group_info
                .as_ref()
                .map_or("None".into(), |g| format!("<{} bytes>", g.len())),
        )
    }
}

/// A proposal was validated and cached for the next commit.
#[pyclass(module = "mls_provider._mls", frozen, get_all)]
struct ProposalReceived {
    proposal_type: &'static str,
    sender_kind: &'static str,
    sender_index: Option<u32>,
    target_identity: Option<String>,
    target_leaf_index: Option<u32>,
    proposal_ref: Vec<u8>,
}

#[pymethods]
impl ProposalReceived {
    fn __repr__(&self) -> String {
        format!(
            "ProposalReceived(proposal_type={:?}, sender_kind={:?}, sender_index={}, target_identity={})",
            self.proposal_type,
            self.sender_kind,
            py_opt(&self.sender_index),
            py_opt(&self.target_identity.as_ref().map(|i| format!("{i:?}")))
        )
    }
}

/// A commit was validated and applied; the group is at `epoch` now.
#[pyclass(module = "mls_provider._mls", frozen, get_all)]
struct CommitApplied {
    epoch: u64,
    committer: u32,
    is_external: bool,
    added: Vec<Member>,
    removed: Vec<Member>,
    self_removed: bool,
    proposal_refs: Vec<Vec<u8>>,
    by_value_proposals: Vec<&'static str>,
    has_path: bool,
}

#[pymethods]
impl CommitApplied {
    fn __repr__(&self) -> String {
        let names = |v: &[Member]| v.iter().map(|m| m.identity.clone()).collect::<Vec<_>>();
        format!(
            "CommitApplied(epoch={}, committer={}, added={:?}, removed={:?}, self_removed={})",
            self.epoch,
            self.committer,
            names(&self.added),
            names(&self.removed),
            self.self_removed
        )
    }
}

/// A message that changes nothing in this group state (application data, a Welcome, ...).
#[pyclass(module = "mls_provider._mls", frozen, get_all)]
struct OtherMessage {
    kind: &'static str,
}

#[pymethods]
impl OtherMessage {
    fn __repr__(&self) -> String {
        format!("OtherMessage(kind={:?})", self.kind)
    }
}

fn received_to_py(py: Python<'_>, received: engine::Received) -> PyResult<Py<PyAny>> {
    Ok(match received {
        engine::Received::Proposal(p) => Py::new(
            py,
            ProposalReceived {
                proposal_type: p.proposal_type,
                sender_kind: p.sender_kind.as_str(),
                sender_index: p.sender_index,
                target_identity: p.target_identity,
                target_leaf_index: p.target_leaf_index,
                proposal_ref: p.proposal_ref,
            },
        )?
        .into_any(),
        engine::Received::Commit(c) => Py::new(py, commit_to_py(c))?.into_any(),
        engine::Received::Other(kind) => Py::new(py, OtherMessage { kind })?.into_any(),
    })
}

fn commit_to_py(c: engine::CommitApplied) -> CommitApplied {
    CommitApplied {
        epoch: c.epoch,
        committer: c.committer,
        is_external: c.is_external,
        added: c.added.into_iter().map(Member::from).collect(),
        removed: c.removed.into_iter().map(Member::from).collect(),
        self_removed: c.self_removed,
        proposal_refs: c.proposal_refs,
        by_value_proposals: c.by_value_proposals,
        has_path: c.has_path,
    }
}

/// Routing facts of an MLS message, readable without group state.
#[pyclass(module = "mls_provider._mls", frozen, get_all)]
struct MessageInfo {
    wire_format: &'static str,
    content_type: Option<&'static str>,
    group_id: Option<Vec<u8>>,
    epoch: Option<u64>,
    sender_kind: Option<&'static str>,
    sender_index: Option<u32>,
    cipher_suite: Option<u16>,
    welcome_recipients: Vec<Vec<u8>>,
    key_package_ref: Option<Vec<u8>>,
}

#[pymethods]
impl MessageInfo {
    fn __repr__(&self) -> String {
        format!(
            "MessageInfo(wire_format={:?}, content_type={}, epoch={}, sender_kind={}, sender_index={})",
            self.wire_format,
            py_opt(&self.content_type.map(|c| format!("{c:?}"))),
            py_opt(&self.epoch),
            py_opt(&self.sender_kind.map(|c| format!("{c:?}"))),
            py_opt(&self.sender_index)
        )
    }
}

/// What the observer learnt from a validated key package.
#[pyclass(module = "mls_provider._mls", frozen, get_all)]
struct KeyPackageInfo {
    identity: String,
    cipher_suite: u16,
    signature_key: Vec<u8>,
    reference: Vec<u8>,
    room: Option<String>,
    not_after: Option<u64>,
}

#[pymethods]
impl KeyPackageInfo {
    fn __repr__(&self) -> String {
        format!(
            "KeyPackageInfo(identity={:?}, cipher_suite={})",
            self.identity, self.cipher_suite
        )
    }
}

// ---------------------------------------------------------------------------------------
// Keys and clients

/// A signature key pair for one cipher suite (Ed25519 for the default suite 1).
#[pyclass(module = "mls_provider._mls", frozen)]
struct SignatureKeyPair {
    inner: engine::SignatureKeyPair,
}

#[pymethods]
impl SignatureKeyPair {
    #[staticmethod]
    #[pyo3(signature = (cipher_suite = engine::config::DEFAULT_CIPHER_SUITE))]
    fn generate(py: Python<'_>, cipher_suite: u16) -> PyResult<Self> {
        let inner = run(py, || engine::SignatureKeyPair::generate(cipher_suite))?;
        Ok(Self { inner })
    }

    #[staticmethod]
    #[pyo3(signature = (secret_key, cipher_suite = engine::config::DEFAULT_CIPHER_SUITE))]
    fn from_secret(py: Python<'_>, secret_key: &[u8], cipher_suite: u16) -> PyResult<Self> {
        let inner = run(py, || {
            engine::SignatureKeyPair::from_secret(cipher_suite, secret_key)
        })?;
        Ok(Self { inner })
    }

    #[getter]
    fn cipher_suite(&self) -> u16 {
        self.inner.cipher_suite()
    }

    #[getter]
    fn public_key(&self) -> Vec<u8> {
        self.inner.public_key().to_vec()
    }

    /// The secret half. Only for persisting the key; never log it.
    #[getter]
    fn secret_key(&self) -> Vec<u8> {
        self.inner.secret_key().to_vec()
    }

    fn __repr__(&self) -> String {
        format!(
            "SignatureKeyPair(cipher_suite={}, public_key={})",
            self.inner.cipher_suite(),
            hex(self.inner.public_key())
        )
    }
}

/// Formats an Option the way Python's repr would.
fn py_opt<T: std::fmt::Display>(value: &Option<T>) -> String {
    value
        .as_ref()
        .map_or_else(|| "None".to_owned(), T::to_string)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One LiveKit participant identity able to make key packages and create, join and
/// load groups.
#[pyclass(module = "mls_provider._mls", frozen)]
struct MlsClient {
    inner: engine::Client,
}

#[pymethods]
impl MlsClient {
    #[new]
    #[pyo3(signature = (
        identity, key_pair, *, credential = None, authority = None, require_update_path = true
    ))]
    fn new(
        identity: &str,
        key_pair: &SignatureKeyPair,
        credential: Option<Vec<u8>>,
        authority: Option<&Authority>,
        require_update_path: bool,
    ) -> PyResult<Self> {
        let options = engine::ClientOptions {
            credential,
            authority: authority.map(|a| a.inner.clone()),
            require_update_path,
        };
        let inner = engine::Client::with_options(identity, key_pair.inner.clone(), options)
            .map_err(to_py_err)?;
        Ok(Self { inner })
    }

    #[getter]
    fn identity(&self) -> &str {
        self.inner.identity()
    }

    #[getter]
    fn cipher_suite(&self) -> u16 {
        self.inner.cipher_suite()
    }

    /// This client with a renewed authority credential; key packages handed out before
    /// stay usable.
    fn renewed(&self, credential: Vec<u8>) -> PyResult<MlsClient> {
        Ok(MlsClient {
            inner: self.inner.renewed(credential).map_err(to_py_err)?,
        })
    }

    #[getter]
    fn key_pair(&self) -> SignatureKeyPair {
        SignatureKeyPair {
            inner: self.inner.key_pair().clone(),
        }
    }

    fn signing_identity(&self) -> PyResult<Vec<u8>> {
        self.inner.signing_identity().map_err(to_py_err)
    }

    fn generate_key_package(&self, py: Python<'_>) -> PyResult<Vec<u8>> {
        run(py, || self.inner.generate_key_package())
    }

    #[pyo3(signature = (group_id, external_senders = Vec::new()))]
    fn create_group(
        &self,
        py: Python<'_>,
        group_id: &[u8],
        external_senders: Vec<Vec<u8>>,
    ) -> PyResult<Group> {
        let group = run(py, || self.inner.create_group(group_id, &external_senders))?;
        Ok(Group::wrap(group))
    }

    fn join_group(&self, py: Python<'_>, welcome: &[u8]) -> PyResult<Group> {
        let group = run(py, || self.inner.join_group(welcome))?;
        Ok(Group::wrap(group))
    }

    #[pyo3(signature = (group_info, replace_leaf = None))]
    fn join_by_external_commit<'py>(
        &self,
        py: Python<'py>,
        group_info: &[u8],
        replace_leaf: Option<u32>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let (group, commit) = run(py, || {
            self.inner.join_by_external_commit(group_info, replace_leaf)
        })?;
        let group = Py::new(py, Group::wrap(group))?;
        PyTuple::new(
            py,
            [
                group.into_any(),
                commit.into_pyobject(py)?.into_any().unbind(),
            ],
        )
    }

    fn load_group(&self, py: Python<'_>, state: &[u8]) -> PyResult<Group> {
        let group = run(py, || self.inner.load_group(state))?;
        Ok(Group::wrap(group))
    }

    fn __repr__(&self) -> String {
        format!(
            "MlsClient(identity={:?}, cipher_suite={})",
            self.inner.identity(),
            self.inner.cipher_suite()
        )
    }
}

// ---------------------------------------------------------------------------------------
// Groups

/// A member's MLS group. Thread-safe; calls on one group are serialized.
#[pyclass(module = "mls_provider._mls", frozen)]
struct Group {
    inner: Mutex<engine::Group>,
}

impl Group {
    fn wrap(group: engine::Group) -> Self {
        Self {
            inner: Mutex::new(group),
        }
    }

    fn with<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut engine::Group) -> engine::Result<T> + Send,
    ) -> PyResult<T> {
        run(py, || f(&mut lock(&self.inner)))
    }
}

#[pymethods]
impl Group {
    #[getter]
    fn group_id(&self) -> Vec<u8> {
        lock(&self.inner).group_id().to_vec()
    }

    #[getter]
    fn epoch(&self) -> u64 {
        lock(&self.inner).epoch()
    }

    #[getter]
    fn cipher_suite(&self) -> u16 {
        lock(&self.inner).cipher_suite()
    }

    #[getter]
    fn own_leaf_index(&self) -> u32 {
        lock(&self.inner).own_leaf_index()
    }

    #[getter]
    fn identity(&self) -> PyResult<String> {
        lock(&self.inner).identity().map_err(to_py_err)
    }

    #[getter]
    fn is_removed(&self) -> bool {
        lock(&self.inner).is_removed()
    }

    #[getter]
    fn has_pending_commit(&self) -> bool {
        lock(&self.inner).has_pending_commit()
    }

    #[getter]
    fn pending_proposal_count(&self) -> usize {
        lock(&self.inner).pending_proposal_count()
    }

    #[getter]
    fn member_count(&self) -> usize {
        lock(&self.inner).member_count()
    }

    fn members(&self, py: Python<'_>) -> PyResult<Vec<Member>> {
        let members = self.with(py, |g| g.members())?;
        Ok(members.into_iter().map(Member::from).collect())
    }

    fn member_index(&self, identity: &str) -> Option<u32> {
        lock(&self.inner).member_index(identity)
    }

    fn member_at(&self, leaf_index: u32) -> PyResult<Option<Member>> {
        let member = lock(&self.inner).member_at(leaf_index).map_err(to_py_err)?;
        Ok(member.map(Member::from))
    }

    fn external_senders(&self) -> PyResult<Vec<(String, Vec<u8>)>> {
        lock(&self.inner).external_senders().map_err(to_py_err)
    }

    #[pyo3(signature = (add = Vec::new(), remove = Vec::new(), remove_identities = Vec::new()))]
    fn commit(
        &self,
        py: Python<'_>,
        add: Vec<Vec<u8>>,
        mut remove: Vec<u32>,
        remove_identities: Vec<String>,
    ) -> PyResult<CommitOutput> {
        let output = self.with(py, move |g| {
            for identity in &remove_identities {
                let leaf = g.member_index(identity).ok_or_else(|| {
                    engine::Error::invalid_argument(format!("{identity:?} is not a member"))
                })?;
                remove.push(leaf);
            }
            g.commit(&add, &remove)
        })?;
        Ok(CommitOutput {
            commit: output.commit,
            welcome: output.welcome,
            group_info: output.group_info,
            left_out: output.left_out,
        })
    }

    /// A commit of every cached proposal that also renews our credential (and signature
    /// key: ``key_pair``, for which the authority issued ``credential``).
    fn commit_renewal(
        &self,
        py: Python<'_>,
        key_pair: &SignatureKeyPair,
        credential: Vec<u8>,
    ) -> PyResult<CommitOutput> {
        let pair = key_pair.inner.clone();
        let output = self.with(py, move |g| g.commit_renewal(&pair, &credential))?;
        Ok(CommitOutput {
            commit: output.commit,
            welcome: output.welcome,
            group_info: output.group_info,
            left_out: output.left_out,
        })
    }

    fn apply_pending_commit(&self, py: Python<'_>) -> PyResult<CommitApplied> {
        Ok(commit_to_py(self.with(py, |g| g.apply_pending_commit())?))
    }

    fn discard_pending_commit(&self) {
        lock(&self.inner).discard_pending_commit();
    }

    fn process_message(&self, py: Python<'_>, message: &[u8]) -> PyResult<Py<PyAny>> {
        let received = self.with(py, |g| g.process_message(message))?;
        received_to_py(py, received)
    }

    fn export_secret(
        &self,
        py: Python<'_>,
        label: &[u8],
        context: &[u8],
        length: usize,
    ) -> PyResult<Vec<u8>> {
        self.with(py, |g| g.export_secret(label, context, length))
    }

    fn epoch_authenticator(&self) -> PyResult<Vec<u8>> {
        lock(&self.inner).epoch_authenticator().map_err(to_py_err)
    }

    #[pyo3(signature = (with_ratchet_tree = true))]
    fn group_info(&self, py: Python<'_>, with_ratchet_tree: bool) -> PyResult<Vec<u8>> {
        self.with(py, |g| g.group_info(with_ratchet_tree))
    }

    fn to_bytes(&self, py: Python<'_>) -> PyResult<Vec<u8>> {
        self.with(py, |g| g.to_bytes())
    }

    fn __repr__(&self) -> String {
        let g = lock(&self.inner);
        format!(
            "Group(epoch={}, own_leaf_index={}, members={})",
            g.epoch(),
            g.own_leaf_index(),
            g.member_count()
        )
    }
}

// ---------------------------------------------------------------------------------------
// The delivery service's observer

/// The delivery service's MLS identity: validates public handshakes of groups it
/// follows and signs external proposals. It never holds an epoch secret.
#[pyclass(module = "mls_provider._mls", frozen)]
struct ExternalObserver {
    inner: engine::Observer,
}

#[pymethods]
impl ExternalObserver {
    #[new]
    #[pyo3(signature = (identity, key_pair, *, authority = None))]
    fn new(
        identity: &str,
        key_pair: &SignatureKeyPair,
        authority: Option<&Authority>,
    ) -> PyResult<Self> {
        let inner = engine::Observer::new(
            identity,
            key_pair.inner.clone(),
            authority.map(|a| a.inner.clone()),
        )
        .map_err(to_py_err)?;
        Ok(Self { inner })
    }

    #[getter]
    fn identity(&self) -> &str {
        self.inner.identity()
    }

    #[getter]
    fn public_key(&self) -> Vec<u8> {
        self.inner.key_pair().public_key().to_vec()
    }

    fn signing_identity(&self) -> PyResult<Vec<u8>> {
        self.inner.signing_identity().map_err(to_py_err)
    }

    fn observe(&self, py: Python<'_>, group_info: &[u8]) -> PyResult<ObservedGroup> {
        let group = run(py, || self.inner.observe(group_info))?;
        Ok(ObservedGroup::wrap(group))
    }

    fn load(&self, py: Python<'_>, snapshot: &[u8]) -> PyResult<ObservedGroup> {
        let group = run(py, || self.inner.load(snapshot))?;
        Ok(ObservedGroup::wrap(group))
    }

    fn validate_key_package(&self, py: Python<'_>, key_package: &[u8]) -> PyResult<KeyPackageInfo> {
        let info = run(py, || self.inner.validate_key_package(key_package))?;
        Ok(KeyPackageInfo {
            identity: info.identity,
            cipher_suite: info.cipher_suite,
            signature_key: info.signature_key,
            reference: info.reference,
            room: info.room,
            not_after: info.not_after,
        })
    }

    fn __repr__(&self) -> String {
        format!("ExternalObserver(identity={:?})", self.inner.identity())
    }
}

/// The public state of one group as the delivery service follows it.
#[pyclass(module = "mls_provider._mls", frozen)]
struct ObservedGroup {
    inner: Mutex<engine::ObservedGroup>,
}

impl ObservedGroup {
    fn wrap(group: engine::ObservedGroup) -> Self {
        Self {
            inner: Mutex::new(group),
        }
    }

    fn with<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut engine::ObservedGroup) -> engine::Result<T> + Send,
    ) -> PyResult<T> {
        run(py, || f(&mut lock(&self.inner)))
    }
}

#[pymethods]
impl ObservedGroup {
    #[getter]
    fn group_id(&self) -> Vec<u8> {
        lock(&self.inner).group_id().to_vec()
    }

    #[getter]
    fn epoch(&self) -> u64 {
        lock(&self.inner).epoch()
    }

    #[getter]
    fn cipher_suite(&self) -> u16 {
        lock(&self.inner).cipher_suite()
    }

    fn members(&self, py: Python<'_>) -> PyResult<Vec<Member>> {
        let members = self.with(py, |g| g.members())?;
        Ok(members.into_iter().map(Member::from).collect())
    }

    fn member_index(&self, identity: &str) -> Option<u32> {
        lock(&self.inner).member_index(identity)
    }

    fn member_at(&self, leaf_index: u32) -> PyResult<Option<Member>> {
        let member = lock(&self.inner).member_at(leaf_index).map_err(to_py_err)?;
        Ok(member.map(Member::from))
    }

    fn external_senders(&self) -> PyResult<Vec<(String, Vec<u8>)>> {
        lock(&self.inner).external_senders().map_err(to_py_err)
    }

    fn process_message(&self, py: Python<'_>, message: &[u8]) -> PyResult<Py<PyAny>> {
        let received = self.with(py, |g| g.process_message(message))?;
        received_to_py(py, received)
    }

    fn propose_add<'py>(
        &self,
        py: Python<'py>,
        key_package: &[u8],
    ) -> PyResult<(Vec<u8>, Vec<u8>)> {
        self.with(py, |g| g.propose_add(key_package))
    }

    fn propose_remove(&self, py: Python<'_>, leaf_index: u32) -> PyResult<(Vec<u8>, Vec<u8>)> {
        self.with(py, |g| g.propose_remove(leaf_index))
    }

    fn pending_proposal_refs(&self) -> Vec<Vec<u8>> {
        lock(&self.inner).pending_proposal_refs()
    }

    fn clear_proposals(&self) {
        lock(&self.inner).clear_proposals();
    }

    fn snapshot(&self, py: Python<'_>) -> PyResult<Vec<u8>> {
        self.with(py, |g| g.snapshot())
    }

    fn tree_hash(&self) -> Vec<u8> {
        lock(&self.inner).tree_hash()
    }

    /// Whether ``group_info`` describes exactly the observed epoch (same GroupContext).
    fn describes(&self, py: Python<'_>, group_info: &[u8]) -> PyResult<bool> {
        self.with(py, |g| g.describes(group_info))
    }

    /// An independent copy: try a commit on it, keep it only if the commit is accepted.
    fn copy(&self, py: Python<'_>) -> PyResult<ObservedGroup> {
        let copy = self.with(py, |g| Ok(g.clone()))?;
        Ok(ObservedGroup::wrap(copy))
    }

    fn __repr__(&self) -> String {
        let g = lock(&self.inner);
        format!("ObservedGroup(epoch={})", g.epoch())
    }
}

// ---------------------------------------------------------------------------------------
// Free functions and the module

/// Routing facts of an MLS message (wire format, content type, group id, epoch, sender),
/// without any group state.
/// The identity authorities a member (or the DS) trusts: every credential must be an
/// authority credential signed by one of ``public_keys`` (Ed25519) and, with a ``room``,
/// name that room.
#[pyclass(module = "mls_provider._mls", frozen)]
struct Authority {
    inner: engine::Authority,
}

#[pymethods]
impl Authority {
    #[new]
    #[pyo3(signature = (public_keys, room = None))]
    fn new(public_keys: Vec<Vec<u8>>, room: Option<String>) -> PyResult<Self> {
        Ok(Self {
            inner: engine::Authority::new(public_keys, room).map_err(to_py_err)?,
        })
    }

    #[getter]
    fn public_keys(&self) -> Vec<Vec<u8>> {
        self.inner.public_keys().to_vec()
    }

    fn __repr__(&self) -> String {
        format!("Authority({} key(s))", self.inner.public_keys().len())
    }
}

/// An authority credential, decoded (its signature is not checked here).
#[pyclass(module = "mls_provider._mls", frozen, get_all)]
struct AuthorityCredential {
    identity: String,
    room: String,
    not_before: u64,
    not_after: u64,
    signature: Vec<u8>,
}

#[pymethods]
impl AuthorityCredential {
    fn __repr__(&self) -> String {
        format!(
            "AuthorityCredential(identity={:?}, room={:?}, not_before={}, not_after={})",
            self.identity, self.room, self.not_before, self.not_after
        )
    }
}

/// The bytes an identity authority signs to vouch for ``identity`` in ``room`` holding
/// ``signature_key`` from ``not_before`` to ``not_after`` (Unix seconds).
#[pyfunction]
fn credential_signed_bytes(
    signature_key: &[u8],
    identity: &str,
    room: &str,
    not_before: u64,
    not_after: u64,
) -> PyResult<Vec<u8>> {
    engine::credential::signed_bytes(signature_key, identity, room, not_before, not_after)
        .map_err(to_py_err)
}

/// The body of an authority credential (what ``MlsClient(credential=...)`` takes).
#[pyfunction]
fn encode_credential(
    identity: &str,
    room: &str,
    not_before: u64,
    not_after: u64,
    signature: Vec<u8>,
) -> PyResult<Vec<u8>> {
    let credential = engine::AuthorityCredential {
        identity: identity.to_owned(),
        room: room.to_owned(),
        not_before,
        not_after,
        signature,
    };
    // encode what decodes: the same checks as for a received credential
    let encoded = credential.encode().map_err(to_py_err)?;
    engine::AuthorityCredential::decode(&encoded).map_err(to_py_err)?;
    Ok(encoded)
}

#[pyfunction]
fn decode_credential(data: &[u8]) -> PyResult<AuthorityCredential> {
    let c = engine::AuthorityCredential::decode(data).map_err(to_py_err)?;
    Ok(AuthorityCredential {
        identity: c.identity,
        room: c.room,
        not_before: c.not_before,
        not_after: c.not_after,
        signature: c.signature,
    })
}

#[pyfunction]
fn message_info(py: Python<'_>, message: &[u8]) -> PyResult<MessageInfo> {
    let info = run(py, || engine::message_info(message))?;
    Ok(MessageInfo {
        wire_format: info.wire_format,
        content_type: info.content_type,
        group_id: info.group_id,
        epoch: info.epoch,
        sender_kind: info.sender_kind.map(engine::SenderKind::as_str),
        sender_index: info.sender_index,
        cipher_suite: info.cipher_suite,
        welcome_recipients: info.welcome_recipients,
        key_package_ref: info.key_package_ref,
    })
}

#[pymodule]
fn _mls(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("MlsError", py.get_type::<MlsError>())?;
    m.add("DecodeError", py.get_type::<DecodeError>())?;
    m.add("EpochError", py.get_type::<EpochError>())?;
    m.add("ValidationError", py.get_type::<ValidationError>())?;
    m.add("StateError", py.get_type::<StateError>())?;
    m.add("UnsupportedError", py.get_type::<UnsupportedError>())?;
    m.add("InternalError", py.get_type::<InternalError>())?;
    m.add("DEFAULT_CIPHER_SUITE", engine::config::DEFAULT_CIPHER_SUITE)?;
    m.add(
        "SUPPORTED_CIPHER_SUITES",
        engine::config::SUPPORTED_CIPHER_SUITES.to_vec(),
    )?;
    m.add("MAX_EXPORT_LENGTH", engine::group::MAX_EXPORT_LEN)?;
    m.add_class::<SignatureKeyPair>()?;
    m.add_class::<MlsClient>()?;
    m.add_class::<Group>()?;
    m.add_class::<ExternalObserver>()?;
    m.add_class::<ObservedGroup>()?;
    m.add_class::<Member>()?;
    m.add_class::<CommitOutput>()?;
    m.add_class::<ProposalReceived>()?;
    m.add_class::<CommitApplied>()?;
    m.add_class::<OtherMessage>()?;
    m.add_class::<MessageInfo>()?;
    m.add_class::<KeyPackageInfo>()?;
    m.add_function(wrap_pyfunction!(message_info, m)?)?;
    m.add_class::<Authority>()?;
    m.add_class::<AuthorityCredential>()?;
    m.add_function(wrap_pyfunction!(credential_signed_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(encode_credential, m)?)?;
    m.add_function(wrap_pyfunction!(decode_credential, m)?)?;
    m.add(
        "AUTHORITY_CREDENTIAL_TYPE",
        engine::AUTHORITY_CREDENTIAL_TYPE,
    )?;
    Ok(())
}
