//! A worker's stderr: forwarded to the parent's stderr as it arrives, with its last lines
//! kept, so an error about a worker that died can quote what it said before dying.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

/// Bytes of a worker's stderr kept for error reports.
const KEEP: usize = 8 * 1024;
/// Lines quoted in an error.
const LINES: usize = 12;

pub(crate) struct StderrTail {
    pipe: Option<File>,
    tail: VecDeque<u8>,
}

impl StderrTail {
    /// Takes the read end of a worker's stderr, made non-blocking.
    pub(crate) fn new(pipe: Option<OwnedFd>) -> StderrTail {
        let pipe = pipe.map(File::from);
        if let Some(pipe) = &pipe {
            use nix::fcntl::{FcntlArg, OFlag, fcntl};
            let _ = fcntl(pipe.as_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK));
        }
        StderrTail {
            pipe,
            tail: VecDeque::with_capacity(KEEP),
        }
    }

    /// The descriptor to poll, until end of stream.
    pub(crate) fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.pipe.as_ref().map(AsFd::as_fd)
    }

    /// Forwards whatever is available now; stops at end of stream or when nothing is left.
    pub(crate) fn pump(&mut self) {
        let Some(pipe) = &mut self.pipe else {
            return;
        };
        let mut buf = [0u8; 4096];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) => {
                    self.pipe = None;
                    return;
                }
                Ok(n) => {
                    // Forwarding is best effort: a closed parent stderr must not stop the pool.
                    let _ = io::stderr().lock().write_all(&buf[..n]);
                    self.tail.extend(&buf[..n]);
                    let excess = self.tail.len().saturating_sub(KEEP);
                    self.tail.drain(..excess);
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return, // WouldBlock: nothing more for now
            }
        }
    }

    /// The last lines written, for an error message.
    pub(crate) fn last_lines(&mut self) -> Option<String> {
        self.pump();
        let (front, back) = self.tail.as_slices();
        let text = String::from_utf8_lossy(&[front, back].concat()).into_owned();
        let lines: Vec<&str> = text
            .lines()
            .filter(|line| !line.trim().is_empty())
            .collect();
        let start = lines.len().saturating_sub(LINES);
        let tail = lines[start..].join("\n");
        (!tail.is_empty()).then_some(tail)
    }
}
