//! A page of memory shared by the parent and one worker, where the worker publishes which
//! item it is running and since when.
//!
//! Publishing is one or two plain stores per item, no system call. When the worker dies,
//! the parent reads the page to know exactly which item was running (that item alone gets the
//! `Crashed` error), which items never started (they go back to the queue, unblamed), and,
//! for deadlines, when the running item started.

use crate::error::Error;
use crate::region::Region;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[repr(C)]
struct Status {
    /// What the worker runs, in one word so that the parent never reads one chunk's number
    /// with another's item: the low 32 bits of the sequence number of the chunk it last
    /// started (high half), and the index in that chunk of the item it is running (low
    /// half); the chunk's count once all are done.
    running: AtomicU64,
    /// `CLOCK_MONOTONIC` nanoseconds when that item started (timed chunks only). Written
    /// before `running`: a read of both may pair an item with the next one's start (later,
    /// never earlier), but only once that item has ended.
    started_ns: AtomicU64,
    /// The number of the last shared frame (see `region`) the worker has finished reading.
    worker_took: AtomicU64,
    /// The number of the last shared frame the parent has finished reading.
    parent_took: AtomicU64,
}

const SIZE: usize = std::mem::size_of::<Status>();

/// What the worker last published.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Published {
    /// The chunk's sequence number, its low 32 bits ([`seq_tag`]): the chunks in flight to
    /// one worker at once are far fewer than 2^32.
    pub seq: u32,
    pub item: u32,
    pub started_ns: u64,
}

pub(crate) struct StatusPage {
    region: Region,
}

// SAFETY: the mapping is only accessed through atomics (see `status`).
unsafe impl Sync for StatusPage {}

impl StatusPage {
    /// Creates a zeroed page (parent side). Its descriptor is close-on-exec; the spawner
    /// passes it to one worker explicitly.
    /// Sealed against resizing where the system allows it (a large-frame region that
    /// cannot be sealed is not made; the status page cannot do without).
    pub(crate) fn create() -> Result<StatusPage, Error> {
        let region = Region::create(c"multiproc-status", SIZE)
            .or_else(|_| Region::create_unsealed(c"multiproc-status", SIZE))?;
        Ok(StatusPage { region })
    }

    /// Maps a page created by the parent (worker side); its size is checked.
    pub(crate) fn open(fd: OwnedFd) -> Result<StatusPage, Error> {
        let region = Region::open(fd, SIZE as u64)?;
        Ok(StatusPage { region })
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.region.fd()
    }

    fn status(&self) -> &Status {
        // SAFETY: the mapping is at least SIZE bytes (created so, or checked), page-aligned
        // and valid for our lifetime, and Status holds only atomics, valid for any bit
        // pattern and for access from both processes.
        unsafe { self.region.as_ptr().cast::<Status>().as_ref() }
    }

    /// Worker: item `item` of chunk `seq` starts now.
    #[inline]
    pub(crate) fn publish(&self, seq: u64, item: u32, timed: bool) {
        let status = self.status();
        if timed {
            status.started_ns.store(monotonic_ns(), Ordering::Relaxed);
        }
        let running = u64::from(seq_tag(seq)) << 32 | u64::from(item);
        status.running.store(running, Ordering::Release);
    }

    /// Records that the worker (`by_worker`) or the parent is done with shared frame `n`.
    pub(crate) fn took(&self, by_worker: bool, n: u64) {
        self.took_counter(by_worker).store(n, Ordering::Release);
    }

    /// The last shared frame the worker (`by_worker`) or the parent is done with.
    pub(crate) fn taken(&self, by_worker: bool) -> u64 {
        self.took_counter(by_worker).load(Ordering::Acquire)
    }

    fn took_counter(&self, by_worker: bool) -> &AtomicU64 {
        let status = self.status();
        if by_worker {
            &status.worker_took
        } else {
            &status.parent_took
        }
    }

    /// Parent: what the worker last published.
    pub(crate) fn read(&self) -> Published {
        let status = self.status();
        let running = status.running.load(Ordering::Acquire);
        Published {
            seq: (running >> 32) as u32,
            item: running as u32,
            started_ns: status.started_ns.load(Ordering::Relaxed),
        }
    }
}

/// The part of a chunk's sequence number the status page holds.
pub(crate) fn seq_tag(seq: u64) -> u32 {
    seq as u32
}

/// `timeout` from now, or as far as an `Instant` goes (`Duration::MAX` means never).
pub(crate) fn deadline_after(timeout: Duration) -> std::time::Instant {
    let now = std::time::Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(1 << 32))
}

/// A `poll` timeout for `left`, rounded up to the next millisecond: a wait then never ends
/// just before its deadline (to poll again at once, a busy loop for the rest of it).
pub(crate) fn poll_timeout(left: Duration) -> nix::poll::PollTimeout {
    nix::poll::PollTimeout::try_from(left.as_nanos().div_ceil(1_000_000))
        .unwrap_or(nix::poll::PollTimeout::MAX)
}

/// `CLOCK_MONOTONIC` now, in nanoseconds: one clock for every process of the machine.
pub(crate) fn monotonic_ns() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map_or(Duration::ZERO, Duration::from);
    now.as_nanos() as u64
}

/// A close-on-exec file in memory that has no name on any file system: a memfd where the
/// system has them. Shared by the status page, the regions for large frames and channel
/// messages too large to travel inline.
#[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
pub(crate) fn anonymous_file(name: &std::ffi::CStr) -> std::io::Result<OwnedFd> {
    use nix::sys::memfd::{MFdFlags, memfd_create};
    Ok(memfd_create(name, MFdFlags::MFD_CLOEXEC)?)
}

#[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
pub(crate) fn anonymous_file(name: &std::ffi::CStr) -> std::io::Result<OwnedFd> {
    use std::sync::atomic::AtomicUsize;
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    // An unlinked temporary file: no name outlives this call.
    let path = std::env::temp_dir().join(format!(
        "{}-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    let _ = std::fs::remove_file(&path);
    Ok(file.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_values_are_read_back_through_a_second_mapping() {
        let page = StatusPage::create().unwrap();
        let other = StatusPage::open(page.fd().try_clone_to_owned().unwrap()).unwrap();
        other.publish(7, 3, true);
        let seen = page.read();
        assert_eq!((seen.seq, seen.item), (7, 3));
        assert!(seen.started_ns > 0);
    }

    /// The parent reads the page while the worker writes it: what it reads is always one
    /// item's start, never one chunk's number with another's item.
    #[test]
    fn a_read_never_pairs_one_chunk_with_another_chunks_item() {
        fn item_of(seq: u64) -> u32 {
            (seq as u32).wrapping_mul(2_654_435_761) >> 8
        }
        let page = StatusPage::create().unwrap();
        let worker = StatusPage::open(page.fd().try_clone_to_owned().unwrap()).unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let mut seq = 1;
                while !stop.load(Ordering::Relaxed) {
                    worker.publish(seq, item_of(seq), false);
                    seq += 1;
                }
            });
            let mut torn = 0;
            for _ in 0..2_000_000 {
                let seen = page.read();
                if seen.seq != 0 && seen.item != item_of(seen.seq.into()) {
                    torn += 1;
                }
            }
            stop.store(true, Ordering::Relaxed);
            assert_eq!(
                torn, 0,
                "reads that paired a chunk with another chunk's item"
            );
        });
    }
}
