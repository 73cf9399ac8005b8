//! The audit trail: typed records and the per-instance hash chain.
//!
//! Every transition, call, decision and escalation of a workflow instance is
//! one [`AuditRecord`] on the audit stream (`tallyman.<namespace>.audit.<workflow>`).
//! The records of one instance, identified by `(namespace, workflow, key)`,
//! form a chain: `seq` numbers them from 1, and each record carries the hash
//! of the one before it.
//!
//! ```text
//!   seq 1               seq 2               seq 3
//!  ┌─────────────┐     ┌─────────────┐     ┌─────────────┐
//!  │ prev 000…0  │  ┌─▶│ prev h1     │  ┌─▶│ prev h2     │
//!  │ hash h1     │──┘  │ hash h2     │──┘  │ hash h3     │
//!  └─────────────┘     └─────────────┘     └─────────────┘
//! ```
//!
//! `hash` covers every other field, `prev` included. Editing a record breaks
//! its own hash ([`ProblemKind::Modified`]); replacing it with a forgery whose
//! hash is recomputed breaks the link from the next record
//! ([`ProblemKind::BrokenLink`]); removing or reordering records shows in
//! `seq` ([`ProblemKind::Missing`], [`ProblemKind::Reordered`]). What a chain
//! alone cannot show is a cut-off or rewritten *tail*: compare the last `seq`
//! and `hash` with an anchor kept elsewhere, such as the instance's state,
//! which [`Chain::resume`] continues from.
//!
//! [`Chain`] writes chains; [`verify`] checks a stream of interleaved ones.
//!
//! # Canonical encoding
//!
//! `hash` is the lowercase hex SHA-256 of the UTF-8 bytes of the record's
//! JSON form without the `hash` member, written canonically:
//!
//! 1. Objects: members sorted by key, keys compared byte by byte in UTF-8
//!    (which is Unicode code point order: `"Upper" < "a" < "a b" < "aa" < "é"`),
//!    at every depth. No whitespace anywhere: `{"k":v,"l":w}`, `[v,w]`.
//! 2. Arrays keep their order.
//! 3. Strings are written as they are (raw UTF-8; `/` and non-ASCII are not
//!    escaped) except `"` → `\"`, `\` → `\\`, U+0008 → `\b`, U+0009 → `\t`,
//!    U+000A → `\n`, U+000C → `\f`, U+000D → `\r`, and every other character
//!    in U+0000–U+001F, and U+007F, → `\u00xx` in lowercase hex.
//! 4. `null`, `true`, `false` literally. `step` is `null` when the record has
//!    no step; the member is never left out.
//! 5. Integers in plain decimal (`-` when negative, no `+`, no exponent);
//!    other numbers as `serde_json` writes them (the shortest form that reads
//!    back as the same f64).
//!
//! So a record always hashes as
//! `{"detail":…,"key":…,"kind":…,"namespace":…,"prev":…,"revision":…,"seq":…,"step":…,"time":…,"workflow":…}`.
//!
//! An auditor can recompute the hash of a stored record without tallyman:
//!
//! ```sh
//! jq -jcS 'del(.hash)' record.json | sha256sum
//! ```
//!
//! (`-S` sorts keys at every depth, `-c` drops whitespace, `-j` the trailing
//! newline.) This agrees with the rule above as long as every number in
//! `detail` is an integer of magnitude at most 2^53, because jq holds numbers
//! as doubles and writes larger or fractional ones its own way (`1e+300`).
//! Writers keep it so: amounts are exact decimals and travel as strings
//! (money is never a float); counts and HTTP statuses are small integers. A
//! test below pins the rule against literal `jq -cS` output.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// `prev` of the first record of every chain: 64 zeros.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One entry of the audit trail of one workflow instance.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
///
/// The strings a chain repeats in every record are shared (`Arc<str>`): the
/// instance's identity, the time of one commit, and each hash, which the
/// next record carries as its `prev`.
pub struct AuditRecord {
    pub namespace: Arc<str>,
    pub workflow: Arc<str>,
    /// The instance key (the correlation value, e.g. the order id).
    pub key: Arc<str>,
    /// Revision of the resolved workflow definition the instance ran on.
    pub revision: Arc<str>,
    /// 1-based position in this instance's chain.
    pub seq: u64,
    /// RFC 3339 timestamp, produced by the writer's clock.
    pub time: Arc<str>,
    pub kind: AuditKind,
    pub step: Option<String>,
    /// Free-form facts: call status, decision, approver, reason … Keep
    /// numbers to integers and put decimals in strings (see the module docs).
    pub detail: Value,
    /// `hash` of the previous record of the same instance, [`GENESIS`] for seq 1.
    pub prev: Arc<str>,
    /// Lowercase hex SHA-256 of the canonical encoding of all other fields.
    pub hash: Arc<str>,
}

/// What an audit record records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub enum AuditKind {
    InstanceStarted,
    EventApplied,
    StepStarted,
    StepCompleted,
    StepSkipped,
    CallAttempted,
    CallSucceeded,
    CallFailed,
    CheckFailed,
    CaseOpened,
    DecisionRecorded,
    CaseApproved,
    CaseRejected,
    CaseEscalated,
    CaseExpired,
    TimerFired,
    SlaBreached,
    EventEmitted,
    DeadLettered,
    InstanceCompleted,
    InstanceRejected,
    InstanceFailed,
}

impl AuditKind {
    pub const ALL: [AuditKind; 22] = [
        AuditKind::InstanceStarted,
        AuditKind::EventApplied,
        AuditKind::StepStarted,
        AuditKind::StepCompleted,
        AuditKind::StepSkipped,
        AuditKind::CallAttempted,
        AuditKind::CallSucceeded,
        AuditKind::CallFailed,
        AuditKind::CheckFailed,
        AuditKind::CaseOpened,
        AuditKind::DecisionRecorded,
        AuditKind::CaseApproved,
        AuditKind::CaseRejected,
        AuditKind::CaseEscalated,
        AuditKind::CaseExpired,
        AuditKind::TimerFired,
        AuditKind::SlaBreached,
        AuditKind::EventEmitted,
        AuditKind::DeadLettered,
        AuditKind::InstanceCompleted,
        AuditKind::InstanceRejected,
        AuditKind::InstanceFailed,
    ];

    /// The serialized name, e.g. `"CallFailed"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            AuditKind::InstanceStarted => "InstanceStarted",
            AuditKind::EventApplied => "EventApplied",
            AuditKind::StepStarted => "StepStarted",
            AuditKind::StepCompleted => "StepCompleted",
            AuditKind::StepSkipped => "StepSkipped",
            AuditKind::CallAttempted => "CallAttempted",
            AuditKind::CallSucceeded => "CallSucceeded",
            AuditKind::CallFailed => "CallFailed",
            AuditKind::CheckFailed => "CheckFailed",
            AuditKind::CaseOpened => "CaseOpened",
            AuditKind::DecisionRecorded => "DecisionRecorded",
            AuditKind::CaseApproved => "CaseApproved",
            AuditKind::CaseRejected => "CaseRejected",
            AuditKind::CaseEscalated => "CaseEscalated",
            AuditKind::CaseExpired => "CaseExpired",
            AuditKind::TimerFired => "TimerFired",
            AuditKind::SlaBreached => "SlaBreached",
            AuditKind::EventEmitted => "EventEmitted",
            AuditKind::DeadLettered => "DeadLettered",
            AuditKind::InstanceCompleted => "InstanceCompleted",
            AuditKind::InstanceRejected => "InstanceRejected",
            AuditKind::InstanceFailed => "InstanceFailed",
        }
    }
}

impl fmt::Display for AuditKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl AuditRecord {
    /// The canonical encoding the hash is taken over (see the module docs).
    pub fn canonical_json(&self) -> String {
        let mut out = String::with_capacity(256 + self.detail_size_hint());
        self.write_canonical(&mut out)
            .expect("writing to a String cannot fail");
        out
    }

    /// The hash this record should carry, recomputed from its content.
    pub fn compute_hash(&self) -> Arc<str> {
        let mut hex = [0u8; 64];
        hex::encode_to_slice(self.digest(), &mut hex).expect("64 bytes hold a SHA-256 in hex");
        Arc::from(std::str::from_utf8(&hex).expect("hex digits are ASCII"))
    }

    /// Whether `hash` matches the record's content.
    pub fn hash_matches(&self) -> bool {
        let mut hex = [0u8; 64];
        hex::encode_to_slice(self.digest(), &mut hex).expect("64 bytes hold a SHA-256 in hex");
        hex.as_slice() == self.hash.as_bytes()
    }

    fn detail_size_hint(&self) -> usize {
        match &self.detail {
            Value::Object(map) => 32 * map.len(),
            _ => 0,
        }
    }

    // The encoding is written into one buffer per thread, kept between
    // records, and hashed in one pass: many small updates of the hasher
    // cost more than the copy.
    fn digest(&self) -> [u8; 32] {
        thread_local! {
            static CANONICAL: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
        }
        CANONICAL.with_borrow_mut(|buf| {
            buf.clear();
            self.write_canonical(buf)
                .expect("writing to a String cannot fail");
            Sha256::digest(buf.as_bytes()).into()
        })
    }

    // Members in sorted key order, written out by hand.
    fn write_canonical<W: fmt::Write>(&self, w: &mut W) -> fmt::Result {
        w.write_str("{\"detail\":")?;
        write_value(w, &self.detail)?;
        w.write_str(",\"key\":")?;
        write_string(w, &self.key)?;
        w.write_str(",\"kind\":")?;
        write_string(w, self.kind.as_str())?;
        w.write_str(",\"namespace\":")?;
        write_string(w, &self.namespace)?;
        w.write_str(",\"prev\":")?;
        write_string(w, &self.prev)?;
        w.write_str(",\"revision\":")?;
        write_string(w, &self.revision)?;
        write!(w, ",\"seq\":{}", self.seq)?;
        w.write_str(",\"step\":")?;
        match &self.step {
            Some(step) => write_string(w, step)?,
            None => w.write_str("null")?,
        }
        w.write_str(",\"time\":")?;
        write_string(w, &self.time)?;
        w.write_str(",\"workflow\":")?;
        write_string(w, &self.workflow)?;
        w.write_char('}')
    }
}

fn write_value<W: fmt::Write>(w: &mut W, value: &Value) -> fmt::Result {
    match value {
        Value::Null => w.write_str("null"),
        Value::Bool(true) => w.write_str("true"),
        Value::Bool(false) => w.write_str("false"),
        // serde_json's Display is its serializer's number format.
        Value::Number(n) => write!(w, "{n}"),
        Value::String(s) => write_string(w, s),
        Value::Array(items) => {
            w.write_char('[')?;
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    w.write_char(',')?;
                }
                write_value(w, item)?;
            }
            w.write_char(']')
        }
        Value::Object(map) => write_object(w, map),
    }
}

fn write_object<W: fmt::Write>(w: &mut W, map: &Map<String, Value>) -> fmt::Result {
    // Without serde_json's `preserve_order` feature (off in this workspace)
    // a Map is a BTreeMap and iterates sorted, so the fast path always runs.
    // Feature unification could turn it on behind our back; then sort here
    // rather than hash a different string.
    if map.keys().is_sorted() {
        write_members(w, map.iter())
    } else {
        let mut members: Vec<_> = map.iter().collect();
        members.sort_unstable_by(|a, b| a.0.cmp(b.0));
        write_members(w, members.into_iter())
    }
}

fn write_members<'a, W: fmt::Write>(
    w: &mut W,
    members: impl Iterator<Item = (&'a String, &'a Value)>,
) -> fmt::Result {
    w.write_char('{')?;
    for (i, (key, value)) in members.enumerate() {
        if i > 0 {
            w.write_char(',')?;
        }
        write_string(w, key)?;
        w.write_char(':')?;
        write_value(w, value)?;
    }
    w.write_char('}')
}

fn write_string<W: fmt::Write>(w: &mut W, s: &str) -> fmt::Result {
    w.write_char('"')?;
    // Most strings need no escape: one check over the bytes, one write.
    if !s
        .bytes()
        .any(|b| b < 0x20 || b == b'"' || b == b'\\' || b == 0x7f)
    {
        w.write_str(s)?;
        return w.write_char('"');
    }
    let mut plain_from = 0;
    for (i, byte) in s.bytes().enumerate() {
        let escape = match byte {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            0x08 => "\\b",
            0x09 => "\\t",
            0x0a => "\\n",
            0x0c => "\\f",
            0x0d => "\\r",
            0x00..=0x1f | 0x7f => "",
            _ => continue,
        };
        // `i` is at an ASCII byte, hence on a char boundary.
        w.write_str(&s[plain_from..i])?;
        if escape.is_empty() {
            write!(w, "\\u{byte:04x}")?;
        } else {
            w.write_str(escape)?;
        }
        plain_from = i + 1;
    }
    w.write_str(&s[plain_from..])?;
    w.write_char('"')
}

/// Writes the records of one instance: numbers them and links each to the
/// one before.
#[derive(Clone, Debug)]
pub struct Chain {
    namespace: Arc<str>,
    workflow: Arc<str>,
    key: Arc<str>,
    revision: Arc<str>,
    seq: u64,
    last_hash: Arc<str>,
}

impl Chain {
    /// A new chain; the first record appended is seq 1.
    pub fn new(
        namespace: impl Into<Arc<str>>,
        workflow: impl Into<Arc<str>>,
        key: impl Into<Arc<str>>,
        revision: impl Into<Arc<str>>,
    ) -> Self {
        Chain {
            namespace: namespace.into(),
            workflow: workflow.into(),
            key: key.into(),
            revision: revision.into(),
            seq: 0,
            last_hash: GENESIS.into(),
        }
    }

    /// Continue after the record `last_seq` whose hash is `last_hash`, as kept
    /// in the instance's state: `Chain::new(ns, wf, key, rev).resume(7, hash)`.
    pub fn resume(mut self, last_seq: u64, last_hash: impl Into<Arc<str>>) -> Self {
        self.seq = last_seq;
        self.last_hash = last_hash.into();
        self
    }

    /// Continue after `last`, in the same instance and revision.
    pub fn after(last: &AuditRecord) -> Self {
        Chain::new(
            last.namespace.clone(),
            last.workflow.clone(),
            last.key.clone(),
            last.revision.clone(),
        )
        .resume(last.seq, last.hash.clone())
    }

    /// Seq of the last record appended (or resumed from); 0 for a new chain.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Hash of the last record appended (or resumed from); [`GENESIS`] for a new chain.
    pub fn last_hash(&self) -> &str {
        &self.last_hash
    }

    /// The next record of the chain, numbered, linked and hashed.
    pub fn append(
        &mut self,
        time: impl Into<Arc<str>>,
        kind: AuditKind,
        step: Option<&str>,
        detail: Value,
    ) -> AuditRecord {
        let record = Link {
            namespace: &self.namespace,
            workflow: &self.workflow,
            key: &self.key,
            revision: &self.revision,
            last_seq: self.seq,
            last_hash: &self.last_hash,
        }
        .next(time.into(), kind, step.map(str::to_owned), detail);
        self.seq = record.seq;
        self.last_hash.clone_from(&record.hash);
        record
    }
}

/// The end of a chain kept elsewhere (the engine keeps an instance's in its
/// state): [`Chain`] without owning anything.
#[derive(Clone, Copy, Debug)]
pub struct Link<'a> {
    pub namespace: &'a Arc<str>,
    pub workflow: &'a Arc<str>,
    pub key: &'a Arc<str>,
    pub revision: &'a Arc<str>,
    /// Seq of the last record, 0 for a new chain.
    pub last_seq: u64,
    /// Hash of the last record, [`GENESIS`] for a new chain.
    pub last_hash: &'a Arc<str>,
}

impl Link<'_> {
    /// The record after the last one, numbered, linked and hashed.
    pub fn next(
        &self,
        time: Arc<str>,
        kind: AuditKind,
        step: Option<String>,
        detail: Value,
    ) -> AuditRecord {
        let mut record = AuditRecord {
            namespace: self.namespace.clone(),
            workflow: self.workflow.clone(),
            key: self.key.clone(),
            revision: self.revision.clone(),
            seq: self.last_seq + 1,
            time,
            kind,
            step,
            detail,
            prev: self.last_hash.clone(),
            hash: Arc::from(""),
        };
        record.hash = record.compute_hash();
        record
    }
}

/// The outcome of [`verify`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifyReport {
    /// Distinct `(namespace, workflow, key)` seen.
    pub instances: usize,
    pub records: usize,
    /// Records stored again, identical to the first copy (of those in
    /// `records`): a commit's audit batch published again after the
    /// broker's duplicate window, when a worker read an instance back.
    /// They add nothing and take nothing away, so they are no problem.
    #[serde(default)]
    pub repeated: usize,
    /// Instances whose chain begins after records the audit stream's own
    /// limits removed (see [`verify_retained`]): their first records are
    /// gone by retention, which no chain can tell from a deletion.
    #[serde(default)]
    pub begin_after_retention: usize,
    /// Where the audit stream begins when its limits removed older
    /// messages (set by the reader of the stream, not by [`verify`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retained_from: Option<u64>,
    /// Ordered by instance (first appearance) and seq.
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// One thing wrong with one instance's chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Problem {
    pub namespace: String,
    pub workflow: String,
    pub key: String,
    /// The record the problem shows at; for [`ProblemKind::Missing`] the
    /// first missing seq.
    pub seq: u64,
    pub kind: ProblemKind,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{} instance {:?} record {}: {}: {}",
            self.namespace, self.workflow, self.key, self.seq, self.kind, self.message
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ProblemKind {
    /// The record's hash does not match its content.
    Modified,
    /// A gap in seq.
    Missing,
    /// Seq goes backwards, a record repeats, or a record links to a later one.
    Reordered,
    /// The record is intact but does not link to the record before it.
    BrokenLink,
}

impl fmt::Display for ProblemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProblemKind::Modified => "Modified",
            ProblemKind::Missing => "Missing",
            ProblemKind::Reordered => "Reordered",
            ProblemKind::BrokenLink => "BrokenLink",
        })
    }
}

/// Check the chains in `records`, in arrival (stream) order; the records of
/// many instances may be interleaved. Per instance: every hash recomputes,
/// seq runs 1, 2, 3 … without gaps or repeats in arrival order, and every
/// `prev` is the hash of the record one seq before.
pub fn verify(records: &[AuditRecord]) -> VerifyReport {
    verify_retained(records, false)
}

/// [`verify`] for a stream whose limits (age, count, size) have removed its
/// oldest messages (`trimmed`): a chain that starts after record 1 is
/// counted in `begin_after_retention` instead of reported Missing. Gaps
/// inside a chain are still reported.
pub fn verify_retained(records: &[AuditRecord], trimmed: bool) -> VerifyReport {
    let mut ids: HashMap<(&str, &str, &str), usize> = HashMap::new();
    let instance_of: Vec<usize> = records
        .iter()
        .map(|r| {
            let next = ids.len();
            *ids.entry((&*r.namespace, &*r.workflow, &*r.key))
                .or_insert(next)
        })
        .collect();
    let intact: Vec<bool> = records.iter().map(AuditRecord::hash_matches).collect();

    let mut found = Findings {
        records,
        instance_of: &instance_of,
        problems: Vec::new(),
        repeated: 0,
        trimmed,
        begin_after_retention: 0,
    };
    for (i, r) in records.iter().enumerate() {
        if !intact[i] {
            found.add(
                i,
                r.seq,
                ProblemKind::Modified,
                format!(
                    "the content of record {} does not match its hash: it was changed after it was written",
                    r.seq
                ),
            );
        }
    }

    // Links and gaps in chain order: by instance, seq, then arrival.
    let mut order: Vec<usize> = (0..records.len()).collect();
    order.sort_unstable_by_key(|&i| (instance_of[i], records[i].seq, i));
    let mut repeat = vec![false; records.len()];
    for chain in order.chunk_by(|&a, &b| instance_of[a] == instance_of[b]) {
        check_chain(chain, &intact, &mut repeat, &mut found);
    }

    // Order of arrival.
    let mut highest = vec![0u64; ids.len()];
    for (i, r) in records.iter().enumerate() {
        let highest = &mut highest[instance_of[i]];
        if !repeat[i] && r.seq < *highest {
            found.add(
                i,
                r.seq,
                ProblemKind::Reordered,
                format!(
                    "record {} arrived after record {}: the records are out of order",
                    r.seq, highest
                ),
            );
        }
        *highest = (*highest).max(r.seq);
    }

    let mut problems = found.problems;
    // Stable: at one seq, Modified stays before what follows from it.
    problems.sort_by_key(|(instance, p)| (*instance, p.seq));
    VerifyReport {
        instances: ids.len(),
        records: records.len(),
        repeated: found.repeated,
        begin_after_retention: found.begin_after_retention,
        retained_from: None,
        problems: problems.into_iter().map(|(_, p)| p).collect(),
    }
}

struct Findings<'a> {
    records: &'a [AuditRecord],
    instance_of: &'a [usize],
    problems: Vec<(usize, Problem)>,
    repeated: usize,
    trimmed: bool,
    begin_after_retention: usize,
}

impl Findings<'_> {
    fn add(&mut self, at: usize, seq: u64, kind: ProblemKind, message: String) {
        let r = &self.records[at];
        self.problems.push((
            self.instance_of[at],
            Problem {
                namespace: r.namespace.to_string(),
                workflow: r.workflow.to_string(),
                key: r.key.to_string(),
                seq,
                kind,
                message,
            },
        ));
    }
}

/// One instance's records, sorted by seq then arrival.
fn check_chain(chain: &[usize], intact: &[bool], repeat: &mut [bool], found: &mut Findings<'_>) {
    let records = found.records;
    let mut before: Option<&AuditRecord> = None;
    for &i in chain {
        let r = &records[i];
        if r.seq == 0 {
            found.add(
                i,
                0,
                ProblemKind::Reordered,
                "a record claims position 0, but the records of an instance are numbered from 1"
                    .to_owned(),
            );
            continue;
        }
        if let Some(b) = before
            && b.seq == r.seq
        {
            repeat[i] = true;
            if intact[i] && r.hash == b.hash {
                // The same record again (hash and content agree, so every
                // field is the same): an outbox published once more.
                found.repeated += 1;
            } else {
                let message = format!("two different records claim to be record {}", r.seq);
                found.add(i, r.seq, ProblemKind::Reordered, message);
            }
            continue;
        }
        let expected = before.map_or(1, |b| b.seq + 1);
        if r.seq > expected && before.is_none() && found.trimmed {
            // Its first records left with the stream's oldest messages.
            found.begin_after_retention += 1;
        } else if r.seq > expected {
            let missing = if r.seq - 1 == expected {
                format!("record {expected} is missing")
            } else {
                format!("records {expected} to {} are missing", r.seq - 1)
            };
            let context = match before {
                Some(b) => format!("the chain jumps from record {} to record {}", b.seq, r.seq),
                None => format!("the first record of this instance is record {}", r.seq),
            };
            found.add(
                i,
                expected,
                ProblemKind::Missing,
                format!("{missing}: {context}"),
            );
        } else if intact[i] {
            // A modified record is already reported; its link proves nothing.
            let want = before.map_or(GENESIS, |b| &*b.hash);
            if *r.prev != *want {
                let (kind, message) = broken_link(r, before, chain, records);
                found.add(i, r.seq, kind, message);
            }
        }
        before = Some(r);
    }
}

fn broken_link(
    r: &AuditRecord,
    before: Option<&AuditRecord>,
    chain: &[usize],
    records: &[AuditRecord],
) -> (ProblemKind, String) {
    let target = chain
        .iter()
        .map(|&j| &records[j])
        .find(|t| t.hash == r.prev && !std::ptr::eq(*t, r));
    match (target, before) {
        (Some(t), _) if t.seq >= r.seq => (
            ProblemKind::Reordered,
            format!(
                "record {} links to record {}, which comes after it: the records were rearranged",
                r.seq, t.seq
            ),
        ),
        (Some(t), Some(b)) if t.seq < b.seq => (
            ProblemKind::BrokenLink,
            format!(
                "record {} links to record {} instead of record {}: the records in between were replaced",
                r.seq, t.seq, b.seq
            ),
        ),
        (_, None) => (
            ProblemKind::BrokenLink,
            format!(
                "record {} should open the chain (prev of 64 zeros) but links to {}: \
                 earlier records were cut off or it is not the original",
                r.seq,
                short(&r.prev)
            ),
        ),
        (_, Some(b)) => (
            ProblemKind::BrokenLink,
            format!(
                "record {} does not follow from record {}: it links to {} but record {} has hash {}; \
                 one of the two was replaced by a different record",
                r.seq,
                b.seq,
                short(&r.prev),
                b.seq,
                short(&b.hash)
            ),
        ),
    }
}

fn short(hash: &str) -> String {
    match hash.get(..12) {
        Some(head) if hash.len() > 12 => format!("{head}…"),
        _ => format!("{hash:?}"),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const NS: &str = "finance";
    const WF: &str = "shipment-to-invoice";

    fn chain_for(key: &str, n: usize) -> Vec<AuditRecord> {
        chain_in(WF, key, n)
    }

    fn chain_in(workflow: &str, key: &str, n: usize) -> Vec<AuditRecord> {
        let steps: [(AuditKind, Option<&str>, Value); 7] = [
            (
                AuditKind::InstanceStarted,
                None,
                json!({"event": "order.created"}),
            ),
            (
                AuditKind::EventApplied,
                Some("both-arrived"),
                json!({"event": "shipment.confirmed", "eventId": "wms-881"}),
            ),
            (
                AuditKind::CallSucceeded,
                Some("order"),
                json!({"connector": "erp", "action": "getOrder", "status": 200, "attempt": 1}),
            ),
            (
                AuditKind::CheckFailed,
                Some("quantities-match"),
                json!({"reason": "QuantityMismatch", "amount": "412.50"}),
            ),
            (
                AuditKind::DecisionRecorded,
                Some("quantities-match"),
                json!({"approver": "alice", "decision": "Approve", "comment": "short shipment ok"}),
            ),
            (
                AuditKind::CallSucceeded,
                Some("invoice"),
                json!({"connector": "erp", "action": "createInvoice", "status": 201}),
            ),
            (AuditKind::InstanceCompleted, None, json!({})),
        ];
        let mut chain = Chain::new(NS, workflow, key, "5f2c9a1e");
        steps
            .into_iter()
            .take(n)
            .enumerate()
            .map(|(i, (kind, step, detail))| {
                chain.append(format!("2025-03-01T12:00:0{i}Z"), kind, step, detail)
            })
            .collect()
    }

    fn problems(records: &[AuditRecord]) -> Vec<(u64, ProblemKind)> {
        verify(records)
            .problems
            .iter()
            .map(|p| (p.seq, p.kind))
            .collect()
    }

    fn only_message(records: &[AuditRecord]) -> String {
        let report = verify(records);
        assert_eq!(report.problems.len(), 1, "{:#?}", report.problems);
        report.problems[0].message.clone()
    }

    #[test]
    fn a_chain_links_and_verifies() {
        let records = chain_for("4711", 5);
        for (i, r) in records.iter().enumerate() {
            assert_eq!(r.seq, i as u64 + 1);
            let prev = if i == 0 {
                GENESIS
            } else {
                &records[i - 1].hash
            };
            assert_eq!(*r.prev, *prev);
            assert_eq!(r.hash.len(), 64);
            assert!(
                r.hash
                    .bytes()
                    .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            );
            assert!(r.hash_matches());
        }
        let report = verify(&records);
        assert!(report.is_ok(), "{:#?}", report.problems);
        assert_eq!((report.instances, report.records), (1, 5));
    }

    #[test]
    fn empty_input_is_ok() {
        assert_eq!(verify(&[]), VerifyReport::default());
        assert!(verify(&[]).is_ok());
    }

    #[test]
    fn an_altered_detail_is_modified_at_that_record() {
        let mut records = chain_for("4711", 5);
        records[2].detail["status"] = json!(500);
        assert_eq!(problems(&records), [(3, ProblemKind::Modified)]);
        let p = &verify(&records).problems[0];
        assert_eq!(
            (p.namespace.as_str(), p.workflow.as_str(), p.key.as_str()),
            (NS, WF, "4711")
        );
        assert!(
            p.message.contains("does not match its hash"),
            "{}",
            p.message
        );
    }

    #[test]
    fn an_altered_hash_is_modified_and_breaks_the_next_link() {
        let mut records = chain_for("4711", 5);
        records[2].hash = records[2].hash.to_uppercase().into();
        assert_eq!(
            problems(&records),
            [(3, ProblemKind::Modified), (4, ProblemKind::BrokenLink)]
        );
    }

    #[test]
    fn a_removed_record_is_missing() {
        let mut records = chain_for("4711", 5);
        records.remove(2);
        assert_eq!(problems(&records), [(3, ProblemKind::Missing)]);
        assert_eq!(
            only_message(&records),
            "record 3 is missing: the chain jumps from record 2 to record 4"
        );

        let mut records = chain_for("4711", 6);
        records.drain(1..4);
        assert_eq!(
            only_message(&records),
            "records 2 to 4 are missing: the chain jumps from record 1 to record 5"
        );

        let records = chain_for("4711", 5).split_off(2);
        assert_eq!(problems(&records), [(1, ProblemKind::Missing)]);
        assert_eq!(
            only_message(&records),
            "records 1 to 2 are missing: the first record of this instance is record 3"
        );
    }

    #[test]
    fn swapped_records_are_reordered() {
        let mut records = chain_for("4711", 5);
        records.swap(2, 3);
        assert_eq!(problems(&records), [(3, ProblemKind::Reordered)]);
        assert_eq!(
            only_message(&records),
            "record 3 arrived after record 4: the records are out of order"
        );
    }

    #[test]
    fn a_chain_that_begins_after_the_streams_retention_is_counted() {
        let records = chain_for("4711", 5).split_off(2);
        let report = verify_retained(&records, true);
        assert!(report.is_ok(), "{:?}", report.problems);
        assert_eq!(report.begin_after_retention, 1);
        // Without limits that removed anything, the same is a deletion.
        assert_eq!(problems(&records), [(1, ProblemKind::Missing)]);
        // A gap inside a chain is reported either way.
        let mut records = chain_for("4711", 5).split_off(1);
        records.remove(1);
        let report = verify_retained(&records, true);
        assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
        assert_eq!(report.problems[0].kind, ProblemKind::Missing);
        assert_eq!(report.problems[0].seq, 3);
    }

    #[test]
    fn an_identical_record_stored_again_is_counted_not_reported() {
        // A commit's batch published again after the duplicate window.
        let mut records = chain_for("4711", 4);
        records.extend(records[1..3].to_vec());
        let report = verify(&records);
        assert!(report.is_ok(), "{:?}", report.problems);
        assert_eq!((report.records, report.repeated), (6, 2));
    }

    #[test]
    fn a_changed_copy_of_a_record_is_reordered() {
        let mut records = chain_for("4711", 4);
        let mut copy = records[1].clone();
        copy.detail["status"] = json!(404);
        copy.hash = copy.compute_hash();
        records.push(copy);
        assert_eq!(problems(&records), [(2, ProblemKind::Reordered)]);
        assert_eq!(
            only_message(&records),
            "two different records claim to be record 2"
        );
        assert_eq!(verify(&records).repeated, 0);
    }

    #[test]
    fn a_link_to_a_later_record_is_reordered() {
        let mut records = chain_for("4711", 5);
        let mut forged = records[2].clone();
        forged.prev = records[4].hash.clone();
        forged.hash = forged.compute_hash();
        records[2] = forged;
        assert_eq!(
            problems(&records),
            [(3, ProblemKind::Reordered), (4, ProblemKind::BrokenLink)]
        );
    }

    #[test]
    fn a_forgery_with_a_recomputed_hash_breaks_the_next_link() {
        let mut records = chain_for("4711", 5);
        let mut forged = records[2].clone();
        forged.detail["status"] = json!(404);
        forged.hash = forged.compute_hash();
        records[2] = forged;
        assert_eq!(problems(&records), [(4, ProblemKind::BrokenLink)]);
        let message = only_message(&records);
        assert!(
            message.starts_with("record 4 does not follow from record 3: it links to "),
            "{message}"
        );
    }

    #[test]
    fn a_forged_first_record_must_start_from_zeros() {
        let mut records = chain_for("4711", 2);
        records[0].prev = records[1].hash.clone();
        records[0].hash = records[0].compute_hash();
        // Record 1 now links forward to record 2, and record 2 no longer follows it.
        assert_eq!(
            problems(&records),
            [(1, ProblemKind::Reordered), (2, ProblemKind::BrokenLink)]
        );

        let mut records = chain_for("4711", 1);
        records[0].prev = "ab".repeat(32).into();
        records[0].hash = records[0].compute_hash();
        assert!(only_message(&records).contains("should open the chain"));
    }

    #[test]
    fn interleaved_instances_verify_independently() {
        let a = chain_for("4711", 5);
        let b = chain_for("4712", 7);
        // Same key, other workflow: a different instance.
        let c = chain_in("return-to-credit-note", "4711", 3);

        let mut stream = Vec::new();
        let (mut a, mut b, mut c) = (a.into_iter(), b.into_iter(), c.into_iter());
        loop {
            let batch: Vec<_> = [b.next(), a.next(), b.next(), c.next()]
                .into_iter()
                .flatten()
                .collect();
            if batch.is_empty() {
                break;
            }
            stream.extend(batch);
        }
        let report = verify(&stream);
        assert!(report.is_ok(), "{:#?}", report.problems);
        assert_eq!((report.instances, report.records), (3, 15));

        // Tampering with one instance is reported against that one only.
        let at = stream
            .iter()
            .position(|r| &*r.key == "4712" && r.seq == 4)
            .unwrap();
        stream[at].detail["amount"] = json!("999999.00");
        let report = verify(&stream);
        assert_eq!(report.problems.len(), 1, "{:#?}", report.problems);
        let p = &report.problems[0];
        assert_eq!(
            (p.workflow.as_str(), p.key.as_str(), p.seq, p.kind),
            (WF, "4712", 4, ProblemKind::Modified)
        );
    }

    #[test]
    fn problems_are_ordered_by_instance_then_seq() {
        let mut a = chain_for("a", 5);
        let mut b = chain_for("b", 5);
        b.remove(3);
        a[4].detail = json!(null);
        a[1].detail = json!(null);
        let stream: Vec<_> = b.into_iter().chain(a).collect();
        let got: Vec<_> = verify(&stream)
            .problems
            .into_iter()
            .map(|p| (p.key, p.seq, p.kind))
            .collect();
        assert_eq!(
            got,
            [
                ("b".to_owned(), 4, ProblemKind::Missing),
                ("a".to_owned(), 2, ProblemKind::Modified),
                ("a".to_owned(), 5, ProblemKind::Modified),
            ]
        );
    }

    #[test]
    fn resume_continues_the_chain() {
        let records = chain_for("4711", 3);
        let last = &records[2];
        let mut resumed = Chain::new(NS, WF, "4711", "5f2c9a1e").resume(last.seq, &*last.hash);
        let mut after = Chain::after(last);
        let next = resumed.append(
            "2025-03-01T13:00:00Z",
            AuditKind::TimerFired,
            None,
            json!({}),
        );
        assert_eq!(
            next,
            after.append(
                "2025-03-01T13:00:00Z",
                AuditKind::TimerFired,
                None,
                json!({})
            )
        );
        assert_eq!((next.seq, &*next.prev), (4, &*last.hash));
        assert_eq!((resumed.seq(), resumed.last_hash()), (4, &*next.hash));

        let mut all = records.clone();
        all.push(next);
        assert!(verify(&all).is_ok());
    }

    // The record as it would sit on the stream, and what `jq -jcS 'del(.hash)'`
    // (jq 1.6) prints for it, and that piped into `sha256sum`.
    const STORED: &str = r#"{
      "namespace": "finance",
      "workflow": "shipment-to-invoice",
      "key": "4711",
      "revision": "5f2c9a1e",
      "seq": 2,
      "time": "2025-03-01T12:00:00Z",
      "kind": "CallSucceeded",
      "step": "invoice",
      "detail": {
        "status": 201,
        "attempt": 1,
        "response": {"invoiceId": "INV-9", "lines": [{"sku": "A-1", "qty": 3}, {"sku": "B-2", "qty": -2}]},
        "approver": "zo\u00eb",
        "note": "tab\there \"quoted\" back\\slash del\u007f bell\u0007 nl\n \ud83d\ude00 a/b",
        "ok": true,
        "none": null,
        "Upper": "sorts before lower case",
        "aa": [], "a": {}, "a b": "space sorts before letters",
        "\u00e9": "non-ASCII keys sort by code point, after ASCII"
      },
      "prev": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
      "hash": "to be ignored"
    }"#;
    const JQ_CS: &str = r#"{"detail":{"Upper":"sorts before lower case","a":{},"a b":"space sorts before letters","aa":[],"approver":"zoë","attempt":1,"none":null,"note":"tab\there \"quoted\" back\\slash del\u007f bell\u0007 nl\n 😀 a/b","ok":true,"response":{"invoiceId":"INV-9","lines":[{"qty":3,"sku":"A-1"},{"qty":-2,"sku":"B-2"}]},"status":201,"é":"non-ASCII keys sort by code point, after ASCII"},"key":"4711","kind":"CallSucceeded","namespace":"finance","prev":"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08","revision":"5f2c9a1e","seq":2,"step":"invoice","time":"2025-03-01T12:00:00Z","workflow":"shipment-to-invoice"}"#;
    const JQ_SHA256: &str = "62fa27f3646a4d6f17b0cee0aca47964f43c060eafbabc4ac96197d8f63dcd09";

    #[test]
    fn the_canonical_encoding_is_what_jq_cs_prints() {
        let record: AuditRecord = serde_json::from_str(STORED).unwrap();
        assert_eq!(record.canonical_json(), JQ_CS);
        assert_eq!(&*record.compute_hash(), JQ_SHA256);
        assert!(!record.hash_matches());

        let mut without_step = record.clone();
        without_step.step = None;
        assert!(without_step.canonical_json().contains(r#","step":null,"#));
    }

    #[test]
    fn the_canonical_encoding_is_the_serialized_record_without_hash() {
        // Every serialized field is hashed, under the same name and value,
        // so a field added to the struct cannot silently escape the hash.
        for record in chain_for("4711", 7)
            .into_iter()
            .chain([serde_json::from_str(STORED).unwrap()])
        {
            let mut serialized = serde_json::to_value(&record).unwrap();
            serialized.as_object_mut().unwrap().remove("hash");
            let canonical: Value = serde_json::from_str(&record.canonical_json()).unwrap();
            assert_eq!(canonical, serialized);
        }
        for kind in AuditKind::ALL {
            assert_eq!(serde_json::to_value(kind).unwrap(), json!(kind.as_str()));
        }
    }

    #[test]
    fn numbers_are_written_as_serde_json_writes_them() {
        let numbers = json!([
            0,
            -7,
            9007199254740993u64,
            u64::MAX,
            i64::MIN,
            0.1,
            1.5,
            -2.25,
            1e300,
            3e-7
        ]);
        let mut out = String::new();
        write_value(&mut out, &numbers).unwrap();
        assert_eq!(out, serde_json::to_string(&numbers).unwrap());
    }

    #[test]
    fn records_serialize_in_camel_case_and_round_trip() {
        let record = chain_for("4711", 2).pop().unwrap();
        let value = serde_json::to_value(&record).unwrap();
        assert_eq!(value["kind"], "EventApplied");
        assert_eq!(value["step"], "both-arrived");
        let back: AuditRecord = serde_json::from_value(value).unwrap();
        assert_eq!(back, record);
        assert!(back.hash_matches());
    }
}
