#![doc = include_str!("../README.md")]
//!
//! # The pieces, in this crate's API
//!
//! - [`task`] registers a function; [`Task`] and [`UnaryTask`] are what it implements.
//! - [`main`] starts the fork server and diverts a re-executed child into the worker loop;
//!   [`StartMethod`] chooses how a pool starts its workers.
//! - [`Pool`] (built with [`PoolBuilder`]) runs tasks: [`Pool::map`], [`Pool::starmap`],
//!   [`Pool::apply`], their `_async` forms returning [`AsyncResult`], and the lazy streams
//!   [`Pool::imap`] and [`Pool::imap_unordered`] ([`IMap`]). [`Chunking`] sets how many items
//!   travel in one message; [`Pool::with_chunking`] sets it for one call ([`Call`]).
//! - [`Process`] runs one task call in a child process of its own; [`pipe`] ([`Sender`],
//!   [`Receiver`], [`Messages`]), [`duplex`] ([`Connection`]) and [`Queue`] carry values
//!   between processes, and travel to them as task arguments.
//! - [`Error`] and [`ErrorKind`]: every failure, typed. [`Payload`] is the bound on values
//!   that cross a process boundary.

/// Registers a free function as a task that worker processes can run by name.
///
/// The function stays callable as before, and its path becomes a value that [`Pool::map`],
/// [`Pool::starmap`], [`Pool::apply`] and the other calls accept. Arguments and the return
/// type must be owned and implement serde's `Serialize` and `Deserialize` ([`Payload`]).
///
/// The name becomes a type and a constant of that type (a zero-sized value) that
/// dereferences to the function, as `typetag` and `linkme` make items of their own. (A
/// constant rather than a unit struct, so that `clippy::no_effect` does not take a call such
/// as `log(line);` for a struct literal.) So, in its module and where it is
/// imported: a `let` or a parameter of the same name does not shadow it (rustc says
/// "`tag` is interpreted as a constant, not a new binding": rename the binding, or give
/// tasks names that variables do not take, such as verbs); a module or a type of the same
/// name clashes with it; it goes to an iterator's `map` as `*square` (the plain function
/// pointer); and `#[deprecated]` on it warns where it is used. It goes on free functions
/// only, not on those of an `impl` block: there rustc says "struct is not supported in
/// `trait`s or `impl`s" (move the function out of the block).
///
/// Options:
/// - `name = "..."`: the registered name; default `module_path!()::fn_name`. Two tasks with
///   one name (two functions of one name in two function bodies of a module, say) make the
///   first pool fail to start, naming both and this option.
/// - `crate = path`: where to find this crate when it is re-exported or renamed in
///   `Cargo.toml` (`mp = { package = "multiproc", ... }` needs `crate = ::mp`, on
///   [`main`] too).
///
/// # Examples
///
/// ```rust,standalone_crate
/// use multiproc::{Pool, task};
///
/// #[task]
/// fn add(x: i64, y: i64) -> i64 {
///     x + y
/// }
///
/// #[task(name = "geometry::area")]
/// fn area(w: f64, h: f64) -> f64 {
///     w * h
/// }
///
/// #[multiproc::main]
/// fn main() -> Result<(), multiproc::Error> {
///     assert_eq!(add(1, 2), 3); // a direct call, in this process
///     let pool = Pool::new(2)?;
///     assert_eq!(pool.starmap(add, [(1, 2), (3, 4)])?, vec![3, 7]);
///     assert_eq!(pool.apply(area, (2.0, 3.0))?, 6.0);
///     Ok(())
/// }
/// ```
pub use multiproc_macros::task;

/// Marks `fn main` as the entry where a program's workers come from.
///
/// In the parent it first forks the fork server (see [`StartMethod::ForkServer`]), then
/// `main`'s body runs unchanged. In a worker started by running the executable again, the
/// worker serves tasks and exits before the body would run. Every binary that
/// starts pools needs it on its `main`: programs, examples, and `harness = false` test
/// targets. Without it, pools fail to start with an error that names this attribute.
///
/// `fn main` may return `()` or a `Result`. With an async runtime, put this attribute below
/// the runtime's (`#[tokio::main] #[multiproc::main] async fn main`): it then sees the
/// synchronous `main` that the runtime's attribute generates.
///
/// # Examples
///
/// ```rust,standalone_crate
/// #[multiproc::task]
/// fn shout(s: String) -> String {
///     s.to_uppercase()
/// }
///
/// #[multiproc::main]
/// fn main() {
///     let pool = multiproc::Pool::new(1).expect("pool");
///     assert_eq!(pool.apply(shout, ("hi".into(),)).expect("task"), "HI");
/// }
/// ```
pub use multiproc_macros::main;

pub use multiproc_runtime::{
    AsyncResult, Call, Chunking, Connection, Error, ErrorKind, IMap, Messages, Payload, Pool,
    PoolBuilder, Process, Queue, Receiver, Sender, StartMethod, Task, UnaryTask, duplex, pipe,
};

/// Used by the code the attributes generate. Not public API.
#[doc(hidden)]
pub mod __private {
    pub use multiproc_runtime::__private::*;
}
