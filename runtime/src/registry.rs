//! The task registry: every `#[task]` submits a [`TaskEntry`] with `inventory`, so a worker
//! process, which is the same executable, finds the function by its registered name.
//!
//! Entries are sorted by name and identified on the wire by their position in that order;
//! the handshake compares a digest of the whole table, so both ends agree on the numbering.

use crate::error::{Error, ErrorKind};
use crate::task::Task;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::OnceLock;

/// Runs `count` encoded argument tuples from `input`, appending one encoded outcome per item
/// to `output`. Monomorphised per task in [`TaskEntry::new`].
pub(crate) type RunChunk =
    fn(input: &[u8], count: u32, output: &mut crate::worker::Out, hooks: &ItemHooks);

/// Called by the worker around every item: lets it publish which item is running.
pub(crate) struct ItemHooks<'a> {
    pub before_item: &'a dyn Fn(u32),
}

/// A registered task. Created by `#[multiproc::task]`; not public API.
#[doc(hidden)]
pub struct TaskEntry {
    name: &'static str,
    file: &'static str,
    line: u32,
    signature: fn() -> &'static str,
    run: RunChunk,
}

impl TaskEntry {
    #[doc(hidden)]
    pub const fn new<T: Task>(file: &'static str, line: u32) -> Self {
        TaskEntry {
            name: T::NAME,
            file,
            line,
            signature: std::any::type_name::<fn(T::Args) -> T::Output>,
            run: crate::worker::run_chunk::<T>,
        }
    }
}

inventory::collect!(TaskEntry);

/// The registry, checked and sorted once per process.
pub(crate) struct Registry {
    entries: Vec<&'static TaskEntry>,
    digest: u64,
}

static REGISTRY: OnceLock<Result<Registry, String>> = OnceLock::new();

impl Registry {
    /// The process's registry, or a [`ErrorKind::Spawn`] error naming two tasks registered
    /// under one name.
    pub(crate) fn get() -> Result<&'static Registry, Error> {
        REGISTRY
            .get_or_init(Registry::build)
            .as_ref()
            .map_err(|message| Error::new(ErrorKind::Spawn, message.clone()))
    }

    fn build() -> Result<Registry, String> {
        let mut entries: Vec<&'static TaskEntry> = inventory::iter::<TaskEntry>().collect();
        entries.sort_by(|a, b| (a.name, a.file, a.line).cmp(&(b.name, b.file, b.line)));
        if let Some(pair) = entries.windows(2).find(|pair| pair[0].name == pair[1].name) {
            return Err(format!(
                "two tasks are registered under the name `{}`: one at {}:{}, one at {}:{}; \
                 give one of them another name with #[task(name = \"...\")]",
                pair[0].name, pair[0].file, pair[0].line, pair[1].file, pair[1].line
            ));
        }
        let mut hasher = DefaultHasher::new();
        env!("CARGO_PKG_VERSION").hash(&mut hasher);
        for entry in &entries {
            entry.name.hash(&mut hasher);
            (entry.signature)().hash(&mut hasher);
        }
        Ok(Registry {
            entries,
            digest: hasher.finish(),
        })
    }

    /// A digest of every name and signature: equal in two processes running one executable.
    pub(crate) fn digest(&self) -> u64 {
        self.digest
    }

    /// The wire id of a task, found by the name the parent knows it by.
    pub(crate) fn id_of(&self, name: &str) -> Option<u32> {
        self.entries
            .binary_search_by(|entry| entry.name.cmp(name))
            .ok()
            .map(|index| index as u32)
    }

    pub(crate) fn id_of_task<T: Task>(&self) -> Result<u32, Error> {
        self.id_of(T::NAME).ok_or_else(|| {
            Error::new(
                ErrorKind::Spawn,
                format!(
                    "task `{}` is not in the registry of this executable",
                    T::NAME
                ),
            )
        })
    }

    pub(crate) fn entry(&self, id: u32) -> Option<&'static TaskEntry> {
        self.entries.get(id as usize).copied()
    }
}

impl TaskEntry {
    pub(crate) fn run(&self) -> RunChunk {
        self.run
    }
}
