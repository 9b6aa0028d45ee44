//! The checkpointer: a thread that commits journalled batches to the database behind the
//! writer.
//!
//! A batch is durable once its journal frame is synced, so the writer hands the frame over and
//! answers; this thread commits the frames it finds waiting, several at a time, without
//! durability, and makes a commit durable where the writer moved to the other journal file (a
//! [`Work::Checkpoint`]), recording the generation that started there. The writer only waits for
//! it when it is a whole journal file behind, which also bounds the frames held here.
//!
//! Frames stay in the [`Backlog`] until their commit is done, so that reading the feed's history
//! finds every batch in the database or here. After a failed commit the thread stops and says
//! why; the store refuses writes until it is reopened, which replays the journal.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redb::Database;
use tracing::{error, warn};

use crate::embedded::{StoreError, commit_frames};
use crate::guard::guarded;
use crate::journal::Frame;

/// Frames one commit takes at most, so that a long backlog does not make one long commit.
const MAX_FRAMES_PER_COMMIT: usize = 256;

/// Frames worth a commit of their own, and how long fewer wait for more. A commit has a cost of
/// its own (the B-tree's path to its last leaf copied, the allocator's state), which a few dozen
/// frames share better than one or two; nobody waits for the checkpointer unless it is a journal
/// file behind, or they say so (see [`Backlog::wait_empty`]).
const GATHER_FRAMES: usize = 32;
const GATHER_TIME: Duration = Duration::from_millis(20);

/// The checkpointer's nice value. Its commits are bulk work nobody waits for, and one of a few
/// milliseconds of CPU held a core that the writer and the requests behind it wanted; lower
/// priority lets them go first. When the cores are saturated it still runs, and if it falls a
/// journal file behind, the writer waits for it.
const NICE: i32 = 10;

pub(crate) enum Work {
    Batch(Arc<Frame>),
    /// Make everything before durable and record this journal generation as the first whose
    /// frames the database lacks.
    Checkpoint(u64),
}

/// What the writer handed over and the checkpointer has not committed yet.
pub(crate) struct Backlog {
    state: Mutex<State>,
    /// Signals the checkpointer: enough work, a checkpoint, someone waiting, or stop.
    work: Condvar,
    /// Signals those waiting for the checkpointer's progress.
    changed: Condvar,
}

struct State {
    queue: VecDeque<Work>,
    /// The journal generation the database durably records.
    checkpointed: u64,
    failed: Option<String>,
    stop: bool,
    /// Someone waits for what is queued: commit it without gathering more.
    hurry: bool,
}

impl State {
    /// Nothing waiting, the database durably at `checkpointed`.
    fn new(checkpointed: u64) -> State {
        State {
            queue: VecDeque::new(),
            checkpointed,
            failed: None,
            stop: false,
            hurry: false,
        }
    }

    fn has_checkpoint(&self) -> bool {
        self.queue
            .iter()
            .any(|work| matches!(work, Work::Checkpoint(_)))
    }
}

impl Backlog {
    pub fn new(checkpointed: u64) -> Arc<Backlog> {
        Arc::new(Backlog {
            state: Mutex::new(State::new(checkpointed)),
            work: Condvar::new(),
            changed: Condvar::new(),
        })
    }

    pub fn push(&self, work: Work) {
        let mut state = self.lock();
        // The first frame wakes it to start gathering; later ones only once there are enough.
        let wake = matches!(work, Work::Checkpoint(_))
            || state.queue.is_empty()
            || state.queue.len() + 1 >= GATHER_FRAMES;
        state.queue.push_back(work);
        drop(state);
        if wake {
            self.work.notify_one();
        }
    }

    /// Why the checkpointer stopped, if it did.
    pub fn failed(&self) -> Option<String> {
        self.lock().failed.clone()
    }

    /// Waits until the database durably records `generation`.
    pub fn wait_checkpointed(&self, generation: u64) -> Result<(), String> {
        self.wait_until(|state| state.checkpointed >= generation)
    }

    /// Waits until every batch handed over is committed.
    pub fn wait_empty(&self) -> Result<(), String> {
        self.wait_until(|state| state.queue.is_empty())
    }

    fn wait_until(&self, done: impl Fn(&State) -> bool) -> Result<(), String> {
        let mut state = self.lock();
        if !done(&state) {
            state.hurry = true;
            self.work.notify_one();
        }
        loop {
            if done(&state) {
                return Ok(());
            }
            if let Some(reason) = &state.failed {
                return Err(reason.clone());
            }
            if state.stop {
                return Err("the store is closing or being reopened".to_owned());
            }
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The batches not committed yet (some may be committed by the time they are read).
    pub fn pending(&self) -> Vec<Arc<Frame>> {
        self.lock()
            .queue
            .iter()
            .filter_map(|work| match work {
                Work::Batch(frame) => Some(frame.clone()),
                Work::Checkpoint(_) => None,
            })
            .collect()
    }

    /// Starts over after the store was reopened: the journal's replay committed everything.
    pub fn reset(&self, checkpointed: u64) {
        *self.lock() = State::new(checkpointed);
    }

    // Every change under the lock is a push, a pop or a field update: a poisoned lock holds a
    // consistent state.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next frames to commit in one transaction, ending with the first checkpoint if any;
    /// `None` once asked to stop. A few frames wait a little for more.
    fn next(&self) -> Option<(Vec<Arc<Frame>>, Option<u64>)> {
        let mut state = self.lock();
        while state.queue.is_empty() && !state.stop {
            state = self.work.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        let gathering = Instant::now();
        while !state.stop
            && !state.hurry
            && state.queue.len() < GATHER_FRAMES
            && !state.has_checkpoint()
        {
            let left = GATHER_TIME.saturating_sub(gathering.elapsed());
            if left.is_zero() {
                break;
            }
            state = self
                .work
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        if state.stop {
            return None;
        }
        let mut frames = Vec::new();
        for work in state.queue.iter().take(MAX_FRAMES_PER_COMMIT) {
            match work {
                Work::Batch(frame) => frames.push(frame.clone()),
                Work::Checkpoint(generation) => return Some((frames, Some(*generation))),
            }
        }
        Some((frames, None))
    }

    fn done(&self, frames: usize, checkpoint: Option<u64>, result: Result<(), StoreError>) {
        let mut state = self.lock();
        match result {
            Ok(()) => {
                let taken = frames + usize::from(checkpoint.is_some());
                state.queue.drain(..taken);
                if let Some(generation) = checkpoint {
                    state.checkpointed = generation;
                }
                if state.queue.is_empty() {
                    state.hurry = false;
                }
            }
            Err(e) => state.failed = Some(e.to_string()),
        }
        drop(state);
        self.changed.notify_all();
    }
}

/// Owns the checkpointer thread; stopping it leaves what is waiting to the journal.
pub(crate) struct Checkpointer {
    backlog: Arc<Backlog>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    pub fn start(
        db: Arc<RwLock<Option<Database>>>,
        backlog: Arc<Backlog>,
        path: PathBuf,
    ) -> Result<Checkpointer, StoreError> {
        let thread = std::thread::Builder::new()
            .name("pitwall-checkpoint".into())
            .spawn({
                let backlog = backlog.clone();
                let path = path.clone();
                move || {
                    // On Linux the nice value of "the calling process" is this thread's alone.
                    if let Err(e) = rustix::process::setpriority_process(None, NICE) {
                        warn!(error = %e, "cannot lower the checkpointer's priority; it runs as the others do");
                    }
                    run(&db, &backlog, &path)
                }
            })
            .map_err(|source| StoreError::Read { path, source })?;
        Ok(Checkpointer {
            backlog,
            thread: Some(thread),
        })
    }

    /// Stops the thread after the commit it is making; what is still waiting stays unapplied
    /// (it is in the journal). A second call does nothing: by then the backlog may serve a
    /// thread started after this one.
    pub fn stop(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.backlog.lock().stop = true;
            self.backlog.work.notify_one();
            self.backlog.changed.notify_all();
            let _ = thread.join();
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(db: &RwLock<Option<Database>>, backlog: &Backlog, path: &std::path::Path) {
    while let Some((frames, checkpoint)) = backlog.next() {
        let result = guarded(path, || {
            let slot = db.read().unwrap_or_else(|e| e.into_inner());
            let db = slot.as_ref().ok_or_else(|| StoreError::Closed {
                path: path.to_owned(),
            })?;
            let frames: Vec<&Frame> = frames.iter().map(Arc::as_ref).collect();
            commit_frames(db, &frames, checkpoint)
        });
        if let Err(e) = &result {
            error!(path = %path.display(), error = %e, "committing journalled batches into the store failed; writes are refused until it is reopened (the journal keeps them)");
        }
        let failed = result.is_err();
        backlog.done(frames.len(), checkpoint, result);
        if failed {
            return;
        }
    }
}
