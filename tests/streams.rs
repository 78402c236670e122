//! Calls whose input is still being queued: `close()` on another thread, a closing pool that
//! loses its last worker, dormant workers serving a stream after `close()`; and chunks
//! whose arguments carry more channel handles than one message can.

mod support;

use multiproc::{Chunking, ErrorKind, Pool, Sender, pipe, task};
use serde::{Deserialize, Serialize};
use std::sync::mpsc::{Receiver as StdReceiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::{TestResult, ensure, within};

const LIMIT: Duration = Duration::from_mins(1);

#[task]
fn keep_x((_tx, x): (Sender<u8>, u32)) -> u32 {
    x
}

#[task]
fn square(x: u64) -> u64 {
    x * x
}

/// A chunk whose items carry more channel handles than one message can (253): it goes as
/// several messages, and no item fails.
fn a_chunk_with_more_handles_than_a_message_carries_is_split() -> TestResult {
    let pool = Pool::new(1)?;
    let (tx, _rx) = pipe::<u8>()?;
    let items: Vec<(Sender<u8>, u32)> = (0..300).map(|x| (tx.clone(), x)).collect();
    let out: Vec<_> = pool
        .with_chunking(Chunking::Fixed(300))
        .imap(keep_x, items)
        .collect();
    ensure(out.len() == 300, format!("{} outputs", out.len()))?;
    let failed: Vec<String> = out
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.as_ref().err().map(|e| format!("item {i}: {e}")))
        .collect();
    ensure(failed.is_empty(), format!("Fixed(300): {failed:?}"))
}

fn automatic_chunks_with_more_handles_than_a_message_carries_are_split() -> TestResult {
    let pool = Pool::new(1)?;
    let (tx, _rx) = pipe::<u8>()?;
    // 1100 items on one worker make chunks of 275 items.
    let items: Vec<(Sender<u8>, u32)> = (0..1100).map(|x| (tx.clone(), x)).collect();
    let out = pool.map(keep_x, items);
    ensure(
        out.as_ref().is_ok_and(|v| v.len() == 1100),
        format!("Auto map: {:?}", out.map(|v| v.len())),
    )?;
    Ok(())
}

/// Signals the closing thread when item `CLOSE_AT` is being encoded, and waits until the
/// pool is closed.
static GATE: Mutex<Option<(SyncSender<()>, StdReceiver<()>)>> = Mutex::new(None);
const CLOSE_AT: u64 = 3;

#[derive(Deserialize, Debug)]
struct Gated(u64);

impl Serialize for Gated {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0 == CLOSE_AT
            && let Some((reached, closed)) = GATE.lock().unwrap().take()
        {
            reached.send(()).unwrap();
            closed.recv().unwrap();
        }
        s.serialize_u64(self.0)
    }
}

#[task]
fn gated(value: Gated) -> u64 {
    value.0
}

/// `map` on one thread, `close()` on another while the map is still encoding its input.
fn close_while_map_encodes(
    chunking: Chunking,
) -> Result<Result<Vec<u64>, multiproc::Error>, String> {
    let pool = Arc::new(Pool::new(2).map_err(|e| e.to_string())?);
    let (reached_tx, reached_rx) = sync_channel(0);
    let (closed_tx, closed_rx) = sync_channel(0);
    *GATE.lock().unwrap() = Some((reached_tx, closed_rx));
    let mapper = {
        let pool = Arc::clone(&pool);
        std::thread::spawn(move || pool.with_chunking(chunking).map(gated, (0..8).map(Gated)))
    };
    reached_rx.recv().map_err(|e| e.to_string())?;
    pool.close();
    closed_tx.send(()).map_err(|e| e.to_string())?;
    let out = within(LIMIT, "map", move || mapper.join().unwrap())?;
    within(LIMIT, "join", move || pool.join())?;
    Ok(out)
}

/// A call made before `close()` runs to its end, whether its input is one batch or several
/// (the two share the gate: one after the other).
fn a_map_still_encoding_when_close_is_called_runs() -> TestResult {
    for chunking in [Chunking::Auto, Chunking::Fixed(8)] {
        let out = close_while_map_encodes(chunking)?;
        ensure(
            out.as_ref().is_ok_and(|v| *v == (0..8).collect::<Vec<_>>()),
            format!("{chunking:?}: {out:?}"),
        )?;
    }
    Ok(())
}

/// Panics when the marker file exists: an initializer that starts failing on command.
#[task]
fn init_unless_marker(marker: String) {
    assert!(std::fs::metadata(&marker).is_err(), "the marker says no");
}

/// A closing pool with a live stream loses its last worker (a replacement cannot start):
/// the stream ends, with errors for what could not run, instead of queueing work that
/// nothing will run.
fn a_stream_of_a_closing_pool_whose_workers_are_gone_ends() -> TestResult {
    let marker = std::env::temp_dir()
        .join(format!("multiproc-streams-{}-marker", std::process::id()))
        .to_string_lossy()
        .into_owned();
    let _ = std::fs::remove_file(&marker);
    let pool = Pool::builder()
        .processes(1)
        .max_tasks_per_child(1)
        .initializer(init_unless_marker, (marker.clone(),))
        .build()?;
    // From now on no new worker can start: the first one runs one task, then is replaced.
    std::fs::write(&marker, b"no")?;
    let stream = pool
        .with_chunking(Chunking::Fixed(1))
        .imap(square, 0..100u64);
    pool.close();
    let out = within(LIMIT, "reading the stream of a closing pool", move || {
        stream.collect::<Vec<_>>()
    });
    let _ = std::fs::remove_file(&marker);
    let out = out?;
    ensure(
        out[0].as_ref().is_ok_and(|&v| v == 0),
        format!("{:?}", out[0]),
    )?;
    ensure(out.len() > 1, "the stream says why it ended")?;
    for item in &out[1..] {
        ensure(
            item.as_ref().is_err_and(|e| e.kind() == ErrorKind::Closed),
            format!("{item:?}"),
        )?;
    }
    within(LIMIT, "join", move || pool.join())?;
    Ok(())
}

/// Workers forked and never used serve a stream after `close()`.
fn dormant_slots_serve_a_stream_after_close() -> TestResult {
    let pool = Pool::new(2)?;
    let stream = pool
        .with_chunking(Chunking::Fixed(1))
        .imap(square, 0..50u64);
    let idle = pool.imap(square, 0..3u64);
    pool.close();
    let pids = pool.worker_pids();
    ensure(pids.len() == 2, format!("{pids:?}"))?;
    drop(idle);
    let out = within(LIMIT, "reading", move || {
        stream.collect::<Result<Vec<_>, _>>()
    })??;
    ensure(out == (0..50).map(|x| x * x).collect::<Vec<_>>(), "values")?;
    within(LIMIT, "join", move || pool.join())?;
    Ok(())
}

#[multiproc::main]
fn main() {
    support::run(tests![
        a_chunk_with_more_handles_than_a_message_carries_is_split,
        automatic_chunks_with_more_handles_than_a_message_carries_are_split,
        a_map_still_encoding_when_close_is_called_runs,
        a_stream_of_a_closing_pool_whose_workers_are_gone_ends,
        dormant_slots_serve_a_stream_after_close,
    ]);
}
