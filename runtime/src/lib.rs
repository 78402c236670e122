//! Runtime of [multiproc](https://docs.rs/multiproc): the task registry, the worker entry,
//! the wire protocol, the pool and its results. Depend on the `multiproc` crate instead; it
//! re-exports everything public here, with the attribute macros.

mod builder;
mod call;
mod channel;
mod chunk;
mod codec;
mod error;
mod fdpass;
mod forkserver;
mod imap;
mod outcome;
mod pipe;
mod pool;
mod process;
mod protocol;
mod queue;
mod region;
mod registry;
mod result;
mod sched;
mod slot;
mod spawn;
mod status;
mod stderr;
mod supervisor;
mod task;
mod worker;

pub use builder::{PoolBuilder, StartMethod};
pub use call::Call;
pub use chunk::Chunking;
pub use error::{Error, ErrorKind};
pub use imap::IMap;
pub use pipe::{Connection, Messages, Receiver, Sender, duplex, pipe};
pub use pool::Pool;
pub use process::Process;
pub use queue::Queue;
pub use result::AsyncResult;
pub use task::{Payload, Task, UnaryTask};

/// Used by the code `#[multiproc::task]` and `#[multiproc::main]` generate. Not public API:
/// anything here may change in any release.
#[doc(hidden)]
pub mod __private {
    pub use crate::registry::TaskEntry;
    pub use crate::task::{Task, UnaryTask};
    pub use crate::worker::worker_main;
    pub use inventory;
    pub use serde;
}
