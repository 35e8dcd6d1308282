//! Group commit of directory fsyncs: concurrent deliveries into the same directory (every message for
//! one account goes into its `new/`) share one fsync of it, instead of waiting in line for one each.
//!
//! The promise is unchanged: [`GroupSync::sync`] returns only after an fsync of the directory that
//! *started after the call began* has finished, so every name the caller created, renamed or removed
//! there before calling is durable. A round already under way when a caller arrives may have read the
//! directory before the caller's change; the caller waits for the next round, which covers everyone who
//! arrived in the meantime. The first waiter of a round runs it on its own thread (no syncing thread).
//!
//! A failed round fails every caller it covered. A caller that slept through more than one round is
//! told of a failure of any round up to its waking (an error the kernel reports once must not be lost;
//! a spurious error costs a `451` and a retry, never a message).

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

/// One group-commit queue per directory.
#[derive(Default)]
pub struct GroupSync {
    dirs: Mutex<HashMap<PathBuf, Arc<Dir>>>,
}

#[derive(Default)]
struct Dir {
    state: Mutex<State>,
    round_done: Condvar,
}

#[derive(Default)]
struct State {
    /// Callers so far (each takes the next number).
    arrived: u64,
    /// Every caller numbered up to this one is covered by a finished round.
    covered: u64,
    /// A round is under way.
    running: bool,
    /// The highest caller number covered by a failed round, and the failure.
    failed: Option<(u64, Failure)>,
}

#[derive(Clone)]
struct Failure {
    code: Option<i32>,
    kind: io::ErrorKind,
    text: String,
}

impl Failure {
    fn of(e: &io::Error) -> Failure {
        Failure {
            code: e.raw_os_error(),
            kind: e.kind(),
            text: e.to_string(),
        }
    }

    fn error(&self) -> io::Error {
        match self.code {
            Some(code) => io::Error::from_raw_os_error(code),
            None => io::Error::new(self.kind, self.text.clone()),
        }
    }
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic in `fsync` (there is none) must not take every later delivery down with it.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl GroupSync {
    /// Makes the changes to `dir` made before this call durable, with `fsync` (the real one opens the
    /// directory and fsyncs it), sharing the call with concurrent callers for the same directory.
    /// Blocks the calling thread: call it where blocking is allowed (the store's threads).
    pub fn sync(&self, dir: &Path, fsync: impl Fn(&Path) -> io::Result<()>) -> io::Result<()> {
        let queue = {
            let mut dirs = locked(&self.dirs);
            match dirs.get(dir) {
                Some(q) => q.clone(),
                None => dirs.entry(dir.to_path_buf()).or_default().clone(),
            }
        };
        queue.sync(dir, fsync)
    }
}

impl Dir {
    fn sync(&self, dir: &Path, fsync: impl Fn(&Path) -> io::Result<()>) -> io::Result<()> {
        let mut state = locked(&self.state);
        state.arrived += 1;
        let me = state.arrived;
        while state.covered < me {
            if state.running {
                state = self
                    .round_done
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            // Lead a round: it covers everyone who has arrived by now, this caller included.
            state.running = true;
            let upto = state.arrived;
            drop(state);
            let result = fsync(dir);
            state = locked(&self.state);
            state.running = false;
            state.covered = upto;
            if let Err(e) = &result {
                state.failed = Some((upto, Failure::of(e)));
            }
            self.round_done.notify_all();
        }
        match &state.failed {
            Some((upto, failure)) if me <= *upto => Err(failure.error()),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Barrier, mpsc};
    use std::thread;
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_caller_arriving_during_a_round_waits_for_the_next_one() {
        // Round 1 is held inside its fsync until B has arrived; B's change may not be in what round 1
        // read, so B must not return before a second fsync has run from start to end.
        let sync = Arc::new(GroupSync::default());
        let rounds = Arc::new(AtomicUsize::new(0));
        let (in_round, round_started) = mpsc::channel::<()>();
        let (release, released) = mpsc::channel::<()>();
        let released = Arc::new(Mutex::new(released));
        let fsync = {
            let (rounds, released) = (rounds.clone(), released.clone());
            move |_: &Path| {
                let n = rounds.fetch_add(1, Ordering::SeqCst) + 1;
                if n == 1 {
                    in_round.send(()).unwrap();
                    released.lock().unwrap().recv().unwrap();
                }
                Ok(())
            }
        };
        let fsync = Arc::new(fsync);
        let a = {
            let (sync, fsync) = (sync.clone(), fsync.clone());
            thread::spawn(move || sync.sync(Path::new("/m/new"), |d| fsync(d)))
        };
        round_started.recv().unwrap();
        let b = {
            let (sync, fsync, rounds) = (sync.clone(), fsync.clone(), rounds.clone());
            thread::spawn(move || {
                sync.sync(Path::new("/m/new"), |d| fsync(d)).unwrap();
                rounds.load(Ordering::SeqCst)
            })
        };
        thread::sleep(Duration::from_millis(50)); // B is waiting
        release.send(()).unwrap();
        a.join().unwrap().unwrap();
        assert_eq!(
            b.join().unwrap(),
            2,
            "B returned only after a round that began after it"
        );
    }

    #[test]
    fn concurrent_callers_share_rounds_and_all_see_a_durable_directory() {
        let sync = Arc::new(GroupSync::default());
        let rounds = Arc::new(AtomicUsize::new(0));
        let start = Arc::new(Barrier::new(16));
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let (sync, rounds, start) = (sync.clone(), rounds.clone(), start.clone());
                thread::spawn(move || {
                    start.wait();
                    for _ in 0..20 {
                        sync.sync(Path::new("/m/new"), |_| {
                            rounds.fetch_add(1, Ordering::SeqCst);
                            thread::sleep(Duration::from_millis(2));
                            Ok(())
                        })
                        .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let rounds = rounds.load(Ordering::SeqCst);
        assert!(
            rounds < 320,
            "320 calls took {rounds} fsyncs: none was shared"
        );
        assert!(
            rounds >= 20,
            "one caller alone needs 20 rounds, got {rounds}"
        );
    }

    #[test]
    fn a_failed_round_fails_every_caller_it_covered_and_later_rounds_start_afresh() {
        let sync = GroupSync::default();
        let enospc = |_: &Path| Err(io::Error::from_raw_os_error(28));
        let e = sync.sync(Path::new("/m/new"), enospc).unwrap_err();
        assert_eq!(
            e.raw_os_error(),
            Some(28),
            "the errno survives (ENOSPC answers 452)"
        );
        sync.sync(Path::new("/m/new"), |_| Ok(())).unwrap();
        // Another directory has its own queue.
        sync.sync(Path::new("/other/new"), |_| Ok(())).unwrap();
    }
}
