//! Shared memory for large frames between a slot and its worker.
//!
//! Through the socket, a frame of 8 MiB is copied into the kernel and out again, in pieces
//! the size of the socket buffer (about 200 KiB), each piece a wake-up of the other side. A
//! frame of at least [`SHARED_MIN`] bytes instead goes into a region of shared memory (a
//! memfd, mapped by both processes and reused from frame to frame, so its pages are faulted
//! in once), and the socket carries a small `Shared` frame that says how long it is.
//!
//! Each worker has two regions, both created by the parent, which sends them with a `Region`
//! frame and the memfd (`SCM_RIGHTS`): one for requests (written by the parent) and one for
//! replies (written by the worker). A region holds one shared frame at a time: the reader
//! records on the status page the number of the last shared frame it has finished with, and
//! the writer uses the region only when that is the last one it wrote; otherwise, or when the
//! region is too small, the frame goes through the socket as usual. Nothing ever waits for a
//! region. The parent replaces a region with a larger one only while no shared frame is
//! outstanding in that direction.

use crate::error::{Error, ErrorKind};
use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;

/// Frames at least this long travel through a shared region when one is free.
pub(crate) const SHARED_MIN: usize = 256 * 1024;

/// Regions grow in steps of this.
const STEP: usize = 1 << 20;

/// A shared mapping of a memfd (also the status page's; see `status`).
pub(crate) struct Region {
    map: NonNull<u8>,
    len: usize,
    fd: OwnedFd,
}

// SAFETY: the mapping belongs to this value alone (unmapped on drop); moving it to another
// thread moves that ownership.
unsafe impl Send for Region {}

impl Region {
    /// The size of a region for frames of `len` bytes: a quarter more, in whole steps.
    pub(crate) fn size_for(len: usize) -> usize {
        len.saturating_add(len / 4).next_multiple_of(STEP)
    }

    /// A new, zeroed region of `len` bytes (parent side), named `name` for tools that list
    /// memory files.
    ///
    /// Its size is sealed: a task in the worker that shrank the file would otherwise make
    /// the parent's next access to the mapping fault (`SIGBUS`) and take the whole pool down.
    pub(crate) fn create(name: &std::ffi::CStr, len: usize) -> Result<Region, Error> {
        Region::make(name, len, true)
    }

    /// [`create`](Self::create) without the seal, for a system that refuses seals.
    pub(crate) fn create_unsealed(name: &std::ffi::CStr, len: usize) -> Result<Region, Error> {
        Region::make(name, len, false)
    }

    fn make(name: &std::ffi::CStr, len: usize, seal: bool) -> Result<Region, Error> {
        let fd = if seal {
            sealable_file(name)
        } else {
            crate::status::anonymous_file(name)
        }
        .map_err(|err| Error::io("creating a shared region failed", err))?;
        let size = i64::try_from(len).map_err(|_| too_large(len))?;
        nix::unistd::ftruncate(&fd, size)
            .map_err(|err| Error::io("sizing a shared region failed", err.into()))?;
        if seal {
            seal_size(&fd).map_err(|err| Error::io("sealing a shared region failed", err))?;
        }
        Region::map(fd, len)
    }

    /// Maps a region the peer sent, which it said is `len` bytes long (worker side). The
    /// length is checked against the file before mapping it.
    pub(crate) fn open(fd: OwnedFd, len: u64) -> Result<Region, Error> {
        let size = nix::sys::stat::fstat(&fd)
            .map_err(|err| Error::io("inspecting a shared region failed", err.into()))?
            .st_size;
        let len = usize::try_from(len)
            .ok()
            .filter(|&len| u64::try_from(size).is_ok_and(|size| len as u64 <= size))
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Codec,
                    format!("a shared region announced as {len} bytes has {size}"),
                )
            })?;
        Region::map(fd, len)
    }

    fn map(fd: OwnedFd, len: usize) -> Result<Region, Error> {
        let size = NonZeroUsize::new(len).ok_or_else(|| too_large(0))?;
        // SAFETY: a new shared mapping of a file we own, at least `len` bytes long (created so,
        // or checked); no existing memory is affected.
        let map = unsafe {
            mmap(
                None,
                size,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                &fd,
                0,
            )
        }
        .map_err(|err| Error::io("mapping a shared region failed", err.into()))?;
        Ok(Region {
            map: map.cast(),
            len,
            fd,
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The start of the mapping (page-aligned), for a caller that lays out atomics there.
    pub(crate) fn as_ptr(&self) -> NonNull<u8> {
        self.map
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The first `len` bytes, if the region is that long.
    pub(crate) fn get(&self, len: usize) -> Option<&[u8]> {
        // SAFETY: the mapping is `self.len` bytes, valid for our lifetime. The protocol gives
        // the reader the region alone while it reads (the writer writes only once the reader
        // has recorded that it is done). Only a worker reads in place, what the parent wrote:
        // the parent keeps the protocol, and a worker's own task that broke it would harm its
        // own process alone. The parent, whose peer runs untrusted tasks, copies instead
        // (`copy_frame`).
        (len <= self.len).then(|| unsafe { std::slice::from_raw_parts(self.map.as_ptr(), len) })
    }

    /// The `len` bytes of a shared frame at the start of the region, as announced by the
    /// peer: `Err` if that overruns the region.
    pub(crate) fn shared_frame(&self, len: u64) -> Result<&[u8], Error> {
        let len = self.frame_len(len)?;
        Ok(self.get(len).expect("within the region"))
    }

    /// A shared frame's length as announced by the peer, checked against the region's.
    fn frame_len(&self, len: u64) -> Result<usize, Error> {
        usize::try_from(len)
            .ok()
            .filter(|&len| len <= self.len)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Codec,
                    format!("a shared frame of {len} bytes overruns its region"),
                )
            })
    }

    /// Copies the `len` bytes of a shared frame at the start of the region, as announced by
    /// the peer, into `out` (in place of what it held): `Err` if that overruns the region.
    ///
    /// For a region whose peer may write it while it is read: the parent's replies region,
    /// which a worker's task can scribble on (a thread it left running, native code gone
    /// wrong). What is decoded must be bytes nobody else can change, or a check made while
    /// decoding could be undone before the bytes it checked are used: a `String` validated
    /// as UTF-8 and then copied could hold bytes that are not. One `memcpy` per large reply.
    pub(crate) fn copy_frame(&self, len: u64, out: &mut Vec<u8>) -> Result<(), Error> {
        let len = self.frame_len(len)?;
        out.clear();
        out.reserve(len);
        // SAFETY: `len` is within the mapping (checked above) and within `out`'s capacity
        // (reserved), and our own buffer cannot overlap the mapping. Raw pointers, no
        // reference to the shared bytes: the peer may be writing them, and a racing write
        // only changes which bytes land in our copy.
        unsafe {
            std::ptr::copy_nonoverlapping(self.map.as_ptr(), out.as_mut_ptr(), len);
            out.set_len(len);
        }
        Ok(())
    }

    /// Copies `bytes` to the start of the region, which must be long enough.
    pub(crate) fn fill(&mut self, bytes: &[u8]) {
        assert!(bytes.len() <= self.len, "a region too small for its frame");
        // SAFETY: in bounds (checked above), and the writer has the region alone while it
        // writes (see `get`); the source is our own memory, which cannot overlap the mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.map.as_ptr(), bytes.len());
        }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: `map` came from mmap with this length and is unmapped only here.
        let _ = unsafe { munmap(self.map.cast(), self.len) };
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn sealable_file(name: &std::ffi::CStr) -> std::io::Result<OwnedFd> {
    use nix::sys::memfd::{MFdFlags, memfd_create};
    Ok(memfd_create(
        name,
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )?)
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn seal_size(fd: &OwnedFd) -> std::io::Result<()> {
    use nix::fcntl::{FcntlArg, SealFlag, fcntl};
    let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
    fcntl(fd, FcntlArg::F_ADD_SEALS(seals))?;
    Ok(())
}

// Elsewhere: an unlinked temporary file, unsealed (the pool is supported on Linux only).
#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn sealable_file(name: &std::ffi::CStr) -> std::io::Result<OwnedFd> {
    crate::status::anonymous_file(name)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn seal_size(_fd: &OwnedFd) -> std::io::Result<()> {
    Ok(())
}

fn too_large(len: usize) -> Error {
    Error::new(
        ErrorKind::Codec,
        format!("a shared region of {len} bytes cannot be made"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_region_is_shared_through_its_descriptor() {
        let mut writer = Region::create(c"test", Region::size_for(10)).expect("create");
        assert_eq!(writer.len(), STEP);
        writer.fill(b"0123456789");
        let fd = writer.fd().try_clone_to_owned().expect("dup");
        let reader = Region::open(fd, writer.len() as u64).expect("open");
        assert_eq!(reader.get(10), Some(&b"0123456789"[..]));
        assert_eq!(reader.get(STEP + 1), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_peer_cannot_resize_a_region() {
        let writer = Region::create(c"test", STEP).expect("create");
        let fd = writer.fd().try_clone_to_owned().expect("dup");
        assert!(
            nix::unistd::ftruncate(&fd, 0).is_err(),
            "shrinking is sealed"
        );
        assert!(
            nix::unistd::ftruncate(&fd, 4 << 20).is_err(),
            "growing is sealed"
        );
    }

    #[test]
    fn a_length_beyond_the_file_is_refused() {
        let writer = Region::create(c"test", STEP).expect("create");
        let fd = writer.fd().try_clone_to_owned().expect("dup");
        let err = Region::open(fd, 2 * STEP as u64).err().expect("refused");
        assert_eq!(err.kind(), ErrorKind::Codec);
    }
}
