//! multiproc: placeholder, replaced below.
pub use multiproc_macros::{main, task};
pub use multiproc_runtime::{
    AsyncResult, Call, Chunking, Error, ErrorKind, IMap, Payload, Pool, PoolBuilder, Task, UnaryTask,
};

#[doc(hidden)]
pub mod __private {
    pub use multiproc_runtime::__private::*;
}
