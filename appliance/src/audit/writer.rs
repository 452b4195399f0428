//! The writer thread and its handle: records queued by handlers are
//! committed in groups (one fdatasync each) and acknowledged only once
//! durable; a failed write breaks the trail, and signing stops.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::SystemTime;

use crossbeam_channel::{Receiver, Sender};
use tokio::sync::oneshot;

use crate::config::AuditConfig;
use crate::error::SvsError;

use super::files::{FileSink, Sink, file_name, lock_dir};
use super::record::{ChainHead, Checkpoint, render, rfc3339};
use super::recover::{check_anchor, last_record_time, recover};
use super::{AuditEvent, Entry};

enum Job {
    Append {
        entries: Vec<Entry>,
        ack: oneshot::Sender<Result<u64, SvsError>>,
    },
    Head {
        ack: oneshot::Sender<Result<ChainHead, SvsError>>,
    },
}

/// Counters for metrics and the benchmark. Prometheus handles, created
/// unregistered with the trail and registered by [`crate::metrics::Metrics`].
#[derive(Debug)]
pub struct AuditStats {
    /// Records made durable.
    pub records: prometheus::IntCounter,
    /// Group commits (one fsync each).
    pub fsyncs: prometheus::IntCounter,
    /// Writes or fsyncs that failed (each breaks the trail).
    pub write_errors: prometheus::IntCounter,
    /// Duration of a group commit: write plus fsync.
    pub fsync_seconds: prometheus::Histogram,
}

impl Default for AuditStats {
    fn default() -> Self {
        let counter = |name: &str, help: &str| {
            prometheus::IntCounter::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"))
        };
        AuditStats {
            records: counter("svs_audit_records_total", "Audit records made durable."),
            fsyncs: counter(
                "svs_audit_fsyncs_total",
                "Audit group commits (one fsync each).",
            ),
            write_errors: counter(
                "svs_audit_write_errors_total",
                "Audit writes or fsyncs that failed (each stops signing).",
            ),
            fsync_seconds: crate::metrics::fsync_histogram(),
        }
    }
}

/// Handle to the trail; cheap to share.
pub struct AuditTrail {
    tx: Mutex<Option<Sender<Job>>>,
    broken: Arc<Mutex<Option<String>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    stats: Arc<AuditStats>,
}

impl std::fmt::Debug for AuditTrail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditTrail")
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

struct Writer {
    sink: Box<dyn Sink>,
    seq: u64,
    head: [u8; 32],
    /// The last record's time: the floor for the next one's.
    last_time: String,
    /// The clock was behind `last_time` at the last commit (warned once).
    clock_behind: bool,
    max_file_bytes: u64,
    max_group: usize,
    broken: Arc<Mutex<Option<String>>>,
    stats: Arc<AuditStats>,
}

impl Writer {
    fn run(mut self, rx: Receiver<Job>) {
        let mut buf = Vec::with_capacity(1 << 16);
        let records_of = |job: &Job| match job {
            Job::Append { entries, .. } => entries.len(),
            Job::Head { .. } => 0,
        };
        // A job that would take a group past `max_group` starts the next
        // one; a job larger than `max_group` (a big batch) is a group alone.
        let mut next = None;
        while let Some(first) = next.take().or_else(|| rx.recv().ok()) {
            let mut records = records_of(&first);
            let mut jobs = vec![first];
            while records < self.max_group {
                let Ok(job) = rx.try_recv() else { break };
                let n = records_of(&job);
                if records + n > self.max_group {
                    next = Some(job);
                    break;
                }
                records += n;
                jobs.push(job);
            }
            self.commit(jobs, &mut buf);
        }
        if let Err(e) = self.sink.finish() {
            // Everything acknowledged is durable; only zero-filled space
            // may stay behind, which readers skip and the next start cuts.
            tracing::warn!(error = %e, "audit: cannot cut the last file to its records");
        }
    }

    fn fail(&self, why: String) {
        tracing::error!(reason = %why, "ALARM audit trail cannot be written: signing stops");
        *self.broken.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }

    fn commit(&mut self, jobs: Vec<Job>, buf: &mut Vec<u8>) {
        let broken = self
            .broken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(why) = broken {
            for job in jobs {
                match job {
                    Job::Append { ack, .. } => {
                        let _ = ack.send(Err(SvsError::AuditUnavailable(why.clone())));
                    }
                    Job::Head { ack } => {
                        let _ = ack.send(Err(SvsError::AuditUnavailable(why.clone())));
                    }
                }
            }
            return;
        }
        buf.clear();
        let now = rfc3339(SystemTime::now());
        // `audit verify` takes a record older than its predecessor for
        // damage: a clock stepped back (NTP, by hand) must not cause one.
        // The format's text order is its time order.
        let time = if now < self.last_time {
            if !self.clock_behind {
                tracing::warn!(
                    clock = %now,
                    last_record = %self.last_time,
                    "audit: the clock is behind the last record's time; records keep that time until it catches up"
                );
            }
            self.clock_behind = true;
            self.last_time.clone()
        } else {
            self.clock_behind = false;
            now
        };
        let mut acks = Vec::with_capacity(jobs.len());
        let mut heads = Vec::new();
        let mut count = 0u64;
        let mut unrenderable = None;
        for job in jobs {
            match job {
                Job::Append { entries, ack } => {
                    for entry in &entries {
                        if unrenderable.is_some() {
                            break;
                        }
                        match render(self.seq + 1, &self.head, entry, &time, buf) {
                            Ok(hash) => {
                                self.seq += 1;
                                self.head = hash;
                                count += 1;
                            }
                            Err(e) => unrenderable = Some(e),
                        }
                    }
                    acks.push((ack, self.seq));
                }
                Job::Head { ack } => heads.push(ack),
            }
        }
        // Nothing of a group is written unless all of it can be.
        let result = if let Some(e) = unrenderable {
            Err(std::io::Error::other(format!(
                "cannot serialise a record: {e}"
            )))
        } else if buf.is_empty() {
            Ok(())
        } else {
            let started = std::time::Instant::now();
            let r = self.sink.append(buf).and_then(|()| self.sink.sync());
            self.stats
                .fsync_seconds
                .observe(started.elapsed().as_secs_f64());
            r
        };
        match result {
            Ok(()) => {
                self.stats.records.inc_by(count);
                if count > 0 {
                    self.stats.fsyncs.inc();
                    self.last_time = time;
                }
                for (ack, seq) in acks {
                    let _ = ack.send(Ok(seq));
                }
                for ack in heads {
                    let _ = ack.send(Ok((self.seq, self.head, self.last_time.clone())));
                }
                if self.sink.len() >= self.max_file_bytes
                    && let Err(e) = self.sink.rotate(self.seq + 1)
                {
                    self.stats.write_errors.inc();
                    self.fail(format!("cannot start a new audit file: {e}"));
                }
            }
            Err(e) => {
                self.stats.write_errors.inc();
                let why = format!("write/fsync failed: {e}");
                self.fail(why.clone());
                for (ack, _) in acks {
                    let _ = ack.send(Err(SvsError::AuditUnavailable(why.clone())));
                }
                for ack in heads {
                    let _ = ack.send(Err(SvsError::AuditUnavailable(why.clone())));
                }
            }
        }
    }
}

impl AuditTrail {
    /// Opens (or creates) the trail in `config.dir` and continues its chain.
    /// Blocking: call at start-up.
    /// `anchor` is the audit anchor read from the token: a trail that ends
    /// before it, or holds another record at its seq, is refused before
    /// anything is written.
    pub fn open(config: &AuditConfig, anchor: Option<&Checkpoint>) -> Result<AuditTrail, SvsError> {
        let io = |e: std::io::Error| {
            SvsError::AuditUnavailable(format!("{}: {e}", config.dir.display()))
        };
        std::fs::create_dir_all(&config.dir).map_err(io)?;
        let lock = lock_dir(&config.dir)?;
        let (seq, head, current) = recover(&config.dir)?;
        if let Some(anchor) = anchor {
            check_anchor(&config.dir, anchor, (seq, head))?;
        }
        let preallocate = config.preallocate.then_some(config.max_file_bytes);
        let sink = FileSink::create(&config.dir, current.unwrap_or(seq + 1), preallocate, lock)
            .map_err(io)?;
        let last_time = current
            .map(|first| last_record_time(&config.dir.join(file_name(first))))
            .unwrap_or_default();
        let trail = AuditTrail::with_sink(Box::new(sink), seq, head, last_time, config);
        Ok(trail)
    }

    pub(super) fn with_sink(
        sink: Box<dyn Sink>,
        seq: u64,
        head: [u8; 32],
        last_time: String,
        config: &AuditConfig,
    ) -> AuditTrail {
        let (tx, rx) = crossbeam_channel::unbounded();
        let broken = Arc::new(Mutex::new(None));
        let stats = Arc::new(AuditStats::default());
        let writer = Writer {
            sink,
            seq,
            head,
            last_time,
            clock_behind: false,
            max_file_bytes: config.max_file_bytes,
            max_group: config.max_group_records,
            broken: broken.clone(),
            stats: stats.clone(),
        };
        // fsync blocks: it gets its own thread, never a runtime worker.
        let thread = std::thread::Builder::new()
            .name("svs-audit".into())
            .spawn(move || writer.run(rx))
            .ok();
        AuditTrail {
            tx: Mutex::new(Some(tx)),
            broken,
            thread: Mutex::new(thread),
            stats,
        }
    }

    fn submit(&self, job: Job) -> Result<(), SvsError> {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        match tx.as_ref() {
            Some(tx) => tx
                .send(job)
                .map_err(|_| SvsError::AuditUnavailable("audit writer stopped".into())),
            None => Err(SvsError::AuditUnavailable("audit trail closed".into())),
        }
    }

    async fn append_entries(&self, entries: Vec<Entry>) -> Result<u64, SvsError> {
        self.check()?;
        let (ack, rx) = oneshot::channel();
        self.submit(Job::Append { entries, ack })?;
        rx.await
            .map_err(|_| SvsError::AuditUnavailable("audit writer stopped".into()))?
    }

    /// Appends records; returns once they are on disk (fsync'd).
    pub async fn append(&self, events: Vec<AuditEvent>) -> Result<(), SvsError> {
        if events.is_empty() {
            return Ok(());
        }
        self.append_entries(events.into_iter().map(Entry::Op).collect())
            .await
            .map(|_| ())
    }

    /// Appends a note (`start`, `selftest`, `reload`, `stop`).
    pub async fn note(&self, kind: &'static str, detail: String) -> Result<(), SvsError> {
        self.append_entries(vec![Entry::Note { kind, detail }])
            .await
            .map(|_| ())
    }

    /// Appends the trail's last record (svsd's `stop`) and closes the trail
    /// to appends: whatever a stopping svsd still does after it (a request
    /// past the grace period) is refused, not recorded after the stop.
    /// Returns the head this record made.
    pub async fn last_note(
        &self,
        kind: &'static str,
        detail: String,
    ) -> Result<ChainHead, SvsError> {
        self.check()?;
        let (ack, appended) = oneshot::channel();
        let (head_ack, head) = oneshot::channel();
        {
            let mut tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
            let sender = tx
                .take()
                .ok_or_else(|| SvsError::AuditUnavailable("audit trail closed".into()))?;
            // One after the other on the writer's queue: the head read is
            // the one the note made. The writer commits both, then ends.
            let entries = vec![Entry::Note { kind, detail }];
            sender
                .send(Job::Append { entries, ack })
                .and_then(|()| sender.send(Job::Head { ack: head_ack }))
                .map_err(|_| SvsError::AuditUnavailable("audit writer stopped".into()))?;
        }
        let stopped = |_| SvsError::AuditUnavailable("audit writer stopped".into());
        appended.await.map_err(stopped)??;
        head.await.map_err(stopped)?
    }

    /// Appends notes of one kind together (one group commit); returns once
    /// they are on disk.
    pub async fn notes(&self, kind: &'static str, details: Vec<String>) -> Result<(), SvsError> {
        if details.is_empty() {
            return Ok(());
        }
        let entries = details
            .into_iter()
            .map(|detail| Entry::Note { kind, detail })
            .collect();
        self.append_entries(entries).await.map(|_| ())
    }

    /// The last durable record's seq and hash.
    pub async fn head(&self) -> Result<ChainHead, SvsError> {
        self.check()?;
        let (ack, rx) = oneshot::channel();
        self.submit(Job::Head { ack })?;
        rx.await
            .map_err(|_| SvsError::AuditUnavailable("audit writer stopped".into()))?
    }

    /// Appends a checkpoint: `signature` by the audit key `key` over
    /// `text.message()`.
    pub async fn checkpoint(
        &self,
        text: Checkpoint,
        key: String,
        signature: Vec<u8>,
    ) -> Result<(), SvsError> {
        self.append_entries(vec![Entry::Checkpoint {
            text,
            key,
            signature,
        }])
        .await
        .map(|_| ())
    }

    /// Ok while the trail can be written; the reason otherwise.
    pub fn check(&self) -> Result<(), SvsError> {
        match &*self.broken.lock().unwrap_or_else(|p| p.into_inner()) {
            None => Ok(()),
            Some(why) => Err(SvsError::AuditUnavailable(why.clone())),
        }
    }

    /// Counters.
    pub fn stats(&self) -> &AuditStats {
        &self.stats
    }

    /// Stops the writer after it has committed everything queued. Blocking.
    pub fn close(&self) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

impl Drop for AuditTrail {
    fn drop(&mut self) {
        self.close();
    }
}

// ------------------------------------------------------------ verification
