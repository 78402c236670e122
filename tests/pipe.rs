//! `pipe` and `duplex`: every method, the end of a pipe (every sender gone, in every process,
//! including one that was killed), timeouts, and handles passed to a `Process`, to `Pool`
//! tasks and inside messages.

mod support;

use multiproc::{
    Chunking, Connection, ErrorKind, Pool, Process, Queue, Receiver, Sender, duplex, pipe, task,
};
use std::collections::BTreeSet;
use std::time::Duration;
use support::{TestResult, ensure, within};

const LIMIT: Duration = Duration::from_mins(1);

type Message = (i32, Option<i32>, String);

#[task]
fn produce(tx: Sender<Message>) {
    tx.send((42, None, "hello".to_owned())).expect("send");
}

#[task]
fn send_range(tx: Sender<u32>, from: u32, to: u32) -> u32 {
    for i in from..to {
        tx.send(i).expect("send");
    }
    to - from
}

/// Receives until the pipe ends; returns what it got.
/// Sends `x` on `tx` and returns it; aborts its worker on 0 instead.
#[task]
fn send_or_abort((tx, x): (Sender<u32>, u32)) -> u32 {
    if x == 0 {
        std::process::abort();
    }
    tx.send(x).expect("send");
    x
}

#[task]
fn drain(rx: Receiver<u32>) -> Vec<u32> {
    rx.iter().map(|message| message.expect("recv")).collect()
}

/// Holds `held` (a handle) until a message arrives on `wake`, which never comes: the test
/// kills the process.
#[task]
fn hold_until_woken(held: Sender<u32>, wake: Receiver<()>) {
    let _ = wake.recv();
    drop(held);
}

/// Doubles every number until the other end is gone; returns how many it doubled.
#[task]
fn doubler(conn: Connection<u64, u64>) -> u64 {
    let mut count = 0;
    loop {
        match conn.recv() {
            Ok(x) => conn.send(x * 2).expect("send"),
            Err(err) if err.kind() == ErrorKind::Disconnected => return count,
            Err(err) => panic!("{err}"),
        }
        count += 1;
    }
}

#[task]
fn hold_connection(conn: Connection<u64, u64>, wake: Receiver<()>) {
    let _ = wake.recv();
    drop(conn);
}

/// Sends `count` messages of `size` bytes each, every byte derived from (producer, index).
#[task]
fn send_large(tx: Sender<(u32, u32, Vec<u8>)>, producer: u32, count: u32, size: usize) {
    for index in 0..count {
        tx.send((producer, index, support::pattern(producer, index, size)))
            .expect("send");
    }
}

/// Takes a sender out of a queue and sends on it.
#[task]
fn send_through_received_handle(handles: Queue<Sender<String>>) {
    let tx = handles.get().expect("get");
    tx.send("via a handle in a message".to_owned())
        .expect("send");
}

/// A handle cannot be a task's output: only arguments and messages carry descriptors.
#[task]
fn return_a_sender() -> Sender<u8> {
    pipe::<u8>().expect("pipe").0
}

#[task]
fn big_reply(len: usize) -> serde_bytes::ByteBuf {
    serde_bytes::ByteBuf::from(vec![3; len])
}

#[task]
fn count_senders(senders: Vec<Sender<u8>>) -> usize {
    senders.len()
}

/// As many channel handles as one message carries (253), in the chunk after a large reply,
/// the one that would also announce a shared region to the worker: the worker must get them
/// all, and not be lost over one descriptor too many.
fn the_most_handles_a_chunk_carries_after_a_large_reply() -> TestResult {
    let pool = Pool::new(1)?;
    assert_eq!(pool.apply(big_reply, (1 << 20,))?.len(), 1 << 20);
    let before = pool.worker_pids();
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for _ in 0..253 {
        let (tx, rx) = pipe::<u8>()?;
        senders.push(tx);
        receivers.push(rx);
    }
    assert_eq!(pool.apply(count_senders, (senders,))?, 253);
    ensure(pool.worker_pids() == before, "the worker was not replaced")?;
    // The region the previous chunk could not announce comes with the next one.
    assert_eq!(pool.apply(big_reply, (1 << 20,))?.len(), 1 << 20);
    Ok(())
}

fn every_method_in_one_process() -> TestResult {
    let (tx, rx) = pipe::<String>()?;
    assert_eq!(rx.try_recv()?, None);
    let err = rx
        .recv_timeout(Duration::from_millis(20))
        .expect_err("empty");
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    tx.send("a".to_owned())?;
    let tx2 = tx.clone();
    tx2.send("b".to_owned())?;
    tx.try_clone()?.send("c".to_owned())?;
    assert_eq!(rx.try_recv()?, Some("a".to_owned()));
    assert_eq!(rx.recv_timeout(Duration::from_secs(1))?, "b");
    assert_eq!(rx.clone().recv()?, "c");
    drop(tx);
    tx2.send("still connected".to_owned())?;
    drop(tx2);
    let rest: Vec<String> = rx.iter().collect::<Result<_, _>>()?;
    assert_eq!(rest, ["still connected"]);
    for result in [rx.recv(), rx.recv_timeout(Duration::from_secs(1))] {
        assert_eq!(result.expect_err("ended").kind(), ErrorKind::Disconnected);
    }
    assert_eq!(
        rx.try_recv().expect_err("ended").kind(),
        ErrorKind::Disconnected
    );
    let (tx, rx) = pipe::<u8>()?;
    drop(rx);
    assert_eq!(
        tx.send(1).expect_err("no receiver").kind(),
        ErrorKind::Disconnected
    );
    ensure(format!("{tx:?}").starts_with("Sender"), format!("{tx:?}"))?;
    Ok(())
}

fn the_seeds_program_then_the_end_of_the_pipe() -> TestResult {
    let (tx, rx) = pipe::<Message>()?;
    let mut child = Process::spawn(produce, (tx,))?;
    assert_eq!(rx.recv()?, (42, None, "hello".to_owned()));
    child.join()?;
    // The parent's sender was dropped when the child started, the child's when it exited.
    let err = within(LIMIT, "recv after the last sender", move || rx.recv())?
        .expect_err("no sender is left");
    assert_eq!(err.kind(), ErrorKind::Disconnected, "{err}");
    Ok(())
}

fn senders_in_several_processes_then_disconnect() -> TestResult {
    let (tx, rx) = pipe::<u32>()?;
    let mut children = (0..3)
        .map(|i| Process::spawn(send_range, (tx.clone(), i * 1000, i * 1000 + 1000)))
        .collect::<Result<Vec<_>, _>>()?;
    drop(tx);
    let received = within(LIMIT, "receiving until disconnected", move || {
        rx.iter().collect::<Result<Vec<u32>, _>>()
    })??;
    for child in &mut children {
        assert_eq!(child.join()?, 1000);
    }
    assert_eq!(received.len(), 3000);
    let unique: BTreeSet<u32> = received.iter().copied().collect();
    assert_eq!(unique, (0..3000).collect());
    // Each producer's messages arrive in the order it sent them.
    for producer in 0..3 {
        let theirs: Vec<u32> = received
            .iter()
            .copied()
            .filter(|x| x / 1000 == producer)
            .collect();
        ensure(
            theirs.is_sorted(),
            format!("producer {producer} out of order"),
        )?;
    }
    Ok(())
}

fn receivers_in_several_processes_share_the_messages() -> TestResult {
    let (tx, rx) = pipe::<u32>()?;
    let mut consumers = (0..2)
        .map(|_| Process::spawn(drain, (rx.clone(),)))
        .collect::<Result<Vec<_>, _>>()?;
    drop(rx);
    for i in 0..2000 {
        tx.send(i)?;
    }
    drop(tx);
    let mut all = Vec::new();
    for consumer in &mut consumers {
        let got = consumer.join()?;
        ensure(got.is_sorted(), "each consumer sees the messages in order")?;
        all.extend(got);
    }
    all.sort_unstable();
    assert_eq!(
        all,
        (0..2000).collect::<Vec<_>>(),
        "each message exactly once"
    );
    Ok(())
}

fn a_killed_sender_ends_the_pipe() -> TestResult {
    let (tx, rx) = pipe::<u32>()?;
    let (wake_tx, wake_rx) = pipe::<()>()?;
    let holder = Process::spawn(hold_until_woken, (tx, wake_rx))?;
    let err = rx
        .recv_timeout(Duration::from_millis(20))
        .expect_err("held");
    assert_eq!(err.kind(), ErrorKind::Timeout, "the child holds the sender");
    holder.kill();
    let err = within(LIMIT, "recv after the holder was killed", move || rx.recv())?
        .expect_err("its sender died with it");
    assert_eq!(err.kind(), ErrorKind::Disconnected, "{err}");
    drop(wake_tx);
    Ok(())
}

fn duplex_both_ways_with_a_process() -> TestResult {
    let (left, right) = duplex::<u64, u64>()?;
    let mut child = Process::spawn(doubler, (right,))?;
    for x in 1..=100 {
        left.send(x)?;
        assert_eq!(left.recv()?, 2 * x);
    }
    assert_eq!(left.try_recv()?, None);
    let err = left
        .recv_timeout(Duration::from_millis(20))
        .expect_err("nothing sent");
    assert_eq!(err.kind(), ErrorKind::Timeout);
    drop(left.clone());
    drop(left);
    let doubled = within(LIMIT, "the child sees the end", move || child.join())??;
    assert_eq!(doubled, 100);
    Ok(())
}

fn duplex_peer_killed_disconnects() -> TestResult {
    let (left, right) = duplex::<u64, u64>()?;
    let (wake_tx, wake_rx) = pipe::<()>()?;
    let holder = Process::spawn(hold_connection, (right, wake_rx))?;
    holder.kill();
    let err = within(LIMIT, "recv after the peer was killed", move || left.recv())?
        .expect_err("the peer is gone");
    assert_eq!(err.kind(), ErrorKind::Disconnected, "{err}");
    drop(wake_tx);
    Ok(())
}

fn handles_through_pool_tasks() -> TestResult {
    let pool = Pool::new(2)?;
    let (tx, rx) = pipe::<Message>()?;
    pool.apply(produce, (tx.clone(),))?;
    assert_eq!(rx.recv()?, (42, None, "hello".to_owned()));
    // Several handles in one chunk, one per item.
    let (numbers_tx, numbers_rx) = pipe::<u32>()?;
    let counts = pool.starmap(
        send_range,
        (0..8).map(|i| (numbers_tx.clone(), i * 10, i * 10 + 10)),
    )?;
    assert_eq!(counts, vec![10; 8]);
    drop(numbers_tx);
    let got = within(LIMIT, "receiving until disconnected", move || {
        numbers_rx.iter().collect::<Result<BTreeSet<u32>, _>>()
    })??;
    assert_eq!(got, (0..80).collect());
    let (left, right) = duplex::<u64, u64>()?;
    let doubled = pool.apply_async(doubler, (right,));
    left.send(21)?;
    assert_eq!(left.recv()?, 42);
    drop(left);
    assert_eq!(doubled.get()?, 1);
    drop(tx);
    Ok(())
}

/// Items whose arguments carry channel handles run again after their worker dies when the
/// call has retries (the pool keeps copies of the handles for that): the crashed one, and
/// the ones behind it in its chunk. Without retries the handles went to the dead worker,
/// and those items fail, saying so.
fn items_with_handles_run_again_after_a_crash_given_retries() -> TestResult {
    let pool = Pool::new(1)?;
    let (tx, rx) = pipe::<u32>()?;
    let out: Vec<_> = pool
        .with_chunking(Chunking::Fixed(3))
        .with_retries(1)
        .imap(send_or_abort, (0..3).map(|x| (tx.clone(), x)))
        .collect();
    let [Err(crashed), Ok(1), Ok(2)] = &out[..] else {
        return Err(format!("expected a crash, then 1 and 2: {out:?}").into());
    };
    assert_eq!(crashed.kind(), ErrorKind::Crashed, "{crashed}");
    ensure(
        crashed.to_string().contains("2 attempts"),
        crashed.to_string(),
    )?;
    let mut sent = vec![rx.recv()?, rx.recv()?];
    sent.sort_unstable();
    assert_eq!(sent, [1, 2]);
    let out: Vec<_> = pool
        .with_chunking(Chunking::Fixed(3))
        .imap(send_or_abort, (0..3).map(|x| (tx.clone(), x)))
        .collect();
    let [Err(crashed), Err(first), Err(second)] = &out[..] else {
        return Err(format!("expected three errors: {out:?}").into());
    };
    assert_eq!(crashed.signal(), Some(6), "{crashed}");
    for err in [first, second] {
        assert_eq!(err.kind(), ErrorKind::Crashed, "{err}");
        ensure(
            err.to_string().contains("cannot run again"),
            err.to_string(),
        )?;
    }
    Ok(())
}

/// Holds a handle and returns `x`; aborts its worker on 300 instead.
#[task]
fn hold_or_abort((_held, x): (Sender<u32>, u32)) -> u32 {
    if x == 300 {
        std::process::abort();
    }
    x
}

/// Short chunks whose handles go with them are not queued behind the running one: only the
/// item that crashed fails, as without handles.
fn a_crash_fails_only_its_item_among_short_chunks_with_handles() -> TestResult {
    let pool = Pool::new(1)?;
    let (tx, _rx) = pipe::<u32>()?;
    let failed: Vec<usize> = pool
        .with_chunking(Chunking::Fixed(1))
        .imap(hold_or_abort, (0..600).map(|x| (tx.clone(), x)))
        .enumerate()
        .filter_map(|(index, out)| out.is_err().then_some(index))
        .collect();
    assert_eq!(failed, [300]);
    Ok(())
}

/// Sends 1, 2, 3 on `tx`, drops it, then waits for the parent's word on `ack`.
#[task]
fn send_then_wait((tx, ack): (Sender<u32>, Receiver<()>)) -> u32 {
    for x in 1..=3 {
        tx.send(x).expect("send");
    }
    drop(tx);
    ack.recv().expect("the parent's word");
    3
}

/// A `Sender` given to a pool task is dropped when the task drops it: the parent sees the
/// end of the pipe while the task still runs (the pool keeps no copy of it).
fn a_pool_task_that_drops_its_sender_ends_the_pipe() -> TestResult {
    let pool = Pool::new(1)?;
    let (tx, rx) = pipe::<u32>()?;
    let (ack_tx, ack_rx) = pipe::<()>()?;
    let result = pool.apply_async(send_then_wait, ((tx, ack_rx),));
    let got = within(LIMIT, "receiving until disconnected", move || {
        rx.iter().collect::<Result<Vec<u32>, _>>()
    })??;
    assert_eq!(got, [1, 2, 3]);
    ack_tx.send(())?;
    assert_eq!(result.get()?, 3);
    Ok(())
}

fn handles_travel_inside_messages() -> TestResult {
    let handles = Queue::<Sender<String>>::new()?;
    let mut child = Process::spawn(send_through_received_handle, (handles.clone(),))?;
    let (tx, rx) = pipe::<String>()?;
    handles.put(tx)?;
    assert_eq!(rx.recv()?, "via a handle in a message");
    child.join()?;
    let err = within(LIMIT, "recv after the child", move || rx.recv())?
        .expect_err("the sender travelled, and closed with the child");
    assert_eq!(err.kind(), ErrorKind::Disconnected, "{err}");
    Ok(())
}

fn a_handle_as_output_is_a_clear_error() -> TestResult {
    let err = Process::spawn(return_a_sender, ())?
        .join()
        .expect_err("a handle cannot be an output");
    assert_eq!(err.kind(), ErrorKind::Codec, "{err}");
    ensure(
        err.to_string().contains("argument of a task"),
        err.to_string(),
    )?;
    Ok(())
}

/// A result that never encodes, with a message of its own that postcard does not keep.
#[derive(serde::Serialize, serde::Deserialize, Debug)]
struct Unencodable(#[serde(serialize_with = "refuse")] u8);

#[allow(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's `serialize_with` passes a reference"
)]
fn refuse<S: serde::Serializer>(_: &u8, _: S) -> Result<S::Ok, S::Error> {
    Err(serde::ser::Error::custom("refused"))
}

/// Encodes a handle where handles cannot go (the error is ignored), then returns a result
/// that fails to encode for a reason of its own.
#[task]
fn misuse_a_handle_then_fail(tx: Sender<u32>) -> Unencodable {
    assert!(postcard::to_allocvec(&tx).is_err());
    Unencodable(1)
}

fn a_result_error_does_not_quote_an_old_handle_refusal() -> TestResult {
    let (tx, _rx) = pipe::<u32>()?;
    let err = Process::spawn(misuse_a_handle_then_fail, (tx,))?
        .join()
        .expect_err("the result cannot be encoded");
    assert_eq!(err.kind(), ErrorKind::Codec, "{err}");
    ensure(
        err.to_string().contains("could not encode the result")
            && !err.to_string().contains("channel handle"),
        err.to_string(),
    )
}

fn large_messages_from_several_producers_at_once() -> TestResult {
    const SIZE: usize = 8 << 20;
    let (tx, rx) = pipe::<(u32, u32, Vec<u8>)>()?;
    let mut producers = (0..3)
        .map(|producer| Process::spawn(send_large, (tx.clone(), producer, 2, SIZE)))
        .collect::<Result<Vec<_>, _>>()?;
    drop(tx);
    let mut seen = BTreeSet::new();
    for message in &rx {
        let (producer, index, bytes) = message?;
        ensure(
            bytes == support::pattern(producer, index, SIZE),
            format!("message {index} of producer {producer} arrived intact"),
        )?;
        seen.insert((producer, index));
    }
    assert_eq!(seen.len(), 6);
    for producer in &mut producers {
        producer.join()?;
    }
    Ok(())
}

#[multiproc::main]
fn main() {
    support::run(tests![
        every_method_in_one_process,
        the_seeds_program_then_the_end_of_the_pipe,
        senders_in_several_processes_then_disconnect,
        receivers_in_several_processes_share_the_messages,
        a_killed_sender_ends_the_pipe,
        duplex_both_ways_with_a_process,
        duplex_peer_killed_disconnects,
        handles_through_pool_tasks,
        items_with_handles_run_again_after_a_crash_given_retries,
        a_pool_task_that_drops_its_sender_ends_the_pipe,
        a_crash_fails_only_its_item_among_short_chunks_with_handles,
        handles_travel_inside_messages,
        a_handle_as_output_is_a_clear_error,
        a_result_error_does_not_quote_an_old_handle_refusal,
        large_messages_from_several_producers_at_once,
        the_most_handles_a_chunk_carries_after_a_large_reply,
    ]);
}
