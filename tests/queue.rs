//! `Queue`: every method, many producers and consumers in many processes (every message
//! exactly once), producers and consumers killed in the middle of their work (the queue goes
//! on), 8 MiB messages from several producers at once, and queues passed to `Pool` tasks.

mod support;

use multiproc::{ErrorKind, Pool, Process, Queue, task};
use std::collections::BTreeSet;
use std::time::Duration;
use support::{TestResult, ensure, within};

const LIMIT: Duration = Duration::from_mins(2);

/// (producer, sequence number); `None` tells a consumer to stop.
type Numbered = Option<(u32, u32)>;

#[task]
fn produce(q: Queue<Numbered>, producer: u32, count: u32) {
    for seq in 0..count {
        q.put(Some((producer, seq))).expect("put");
    }
}

/// Takes messages until a `None`; returns them in the order taken.
#[task]
fn consume(q: Queue<Numbered>) -> Vec<(u32, u32)> {
    let mut got = Vec::new();
    while let Some(message) = q.get().expect("get") {
        got.push(message);
    }
    got
}

/// Puts numbered messages until killed.
#[task]
fn produce_forever(q: Queue<Numbered>, producer: u32) {
    for seq in 0.. {
        q.put(Some((producer, seq))).expect("put");
    }
}

/// Puts 8 MiB messages until killed: it is almost always in the middle of one.
#[task]
fn produce_large_forever(q: Queue<(u32, u32, Vec<u8>)>, producer: u32) {
    for index in 0.. {
        q.put((producer, index, support::pattern(producer, index, LARGE)))
            .expect("put");
    }
}

/// Waits for a message that never comes (the test kills it), or takes one and returns it.
#[task]
fn take_one(q: Queue<Numbered>) -> Numbered {
    q.get().expect("get")
}

#[task]
fn put_large(q: Queue<(u32, u32, Vec<u8>)>, producer: u32, count: u32) {
    for index in 0..count {
        q.put((producer, index, support::pattern(producer, index, LARGE)))
            .expect("put");
    }
}

#[task]
fn put_square(q: Queue<u64>, x: u64) {
    q.put(x * x).expect("put");
}

const LARGE: usize = 8 << 20;

fn every_method_in_one_process() -> TestResult {
    let q = Queue::<String>::new()?;
    assert_eq!(q.try_get()?, None);
    let err = q.get_timeout(Duration::from_millis(20)).expect_err("empty");
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    let q2 = q.clone();
    let q3 = q.try_clone()?;
    q.put("a".to_owned())?;
    q2.put("b".to_owned())?;
    q3.put("c".to_owned())?;
    assert_eq!(q3.get()?, "a");
    assert_eq!(q.try_get()?, Some("b".to_owned()));
    assert_eq!(q2.get_timeout(Duration::from_secs(1))?, "c");
    drop(q2);
    drop(q3);
    // Every clone holds both ends: a queue is never disconnected while one lives.
    let err = q.get_timeout(Duration::from_millis(20)).expect_err("empty");
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    let big = "x".repeat(1 << 20);
    q.put(big.clone())?;
    assert_eq!(q.get()?, big);
    ensure(format!("{q:?}").starts_with("Queue"), format!("{q:?}"))?;
    Ok(())
}

fn four_producers_two_consumers_every_message_once() -> TestResult {
    const PER_PRODUCER: u32 = 10_000;
    let q = Queue::<Numbered>::new()?;
    let mut consumers = (0..2)
        .map(|_| Process::spawn(consume, (q.clone(),)))
        .collect::<Result<Vec<_>, _>>()?;
    let mut producers = (0..4)
        .map(|producer| Process::spawn(produce, (q.clone(), producer, PER_PRODUCER)))
        .collect::<Result<Vec<_>, _>>()?;
    let got = within(
        LIMIT,
        "4 x 10 000 messages",
        move || -> Result<_, String> {
            for producer in &mut producers {
                producer.join().map_err(|err| err.to_string())?;
            }
            // Every message is in the queue before these: each consumer stops after the rest.
            for _ in 0..consumers.len() {
                q.put(None).map_err(|err| err.to_string())?;
            }
            consumers
                .iter_mut()
                .map(|consumer| consumer.join().map_err(|err| err.to_string()))
                .collect::<Result<Vec<_>, _>>()
        },
    )??;
    let mut all = BTreeSet::new();
    for taken in &got {
        ensure(!taken.is_empty(), "both consumers took messages")?;
        for producer in 0..4 {
            let theirs: Vec<u32> = taken
                .iter()
                .filter(|(p, _)| *p == producer)
                .map(|&(_, seq)| seq)
                .collect();
            ensure(theirs.is_sorted(), "first in, first out per producer")?;
        }
        for &message in taken {
            ensure(all.insert(message), format!("{message:?} received twice"))?;
        }
    }
    assert_eq!(
        all.len(),
        4 * PER_PRODUCER as usize,
        "every message received"
    );
    Ok(())
}

fn a_producer_killed_mid_stream_does_not_wedge_the_queue() -> TestResult {
    let q = Queue::<Numbered>::new()?;
    let mut doomed = Process::spawn(produce_forever, (q.clone(), 9))?;
    // It is putting as fast as it can: take some, so it is certainly in its stream.
    for expected in 0..1000 {
        assert_eq!(q.get()?, Some((9, expected)));
    }
    doomed.kill();
    let err = doomed.join().expect_err("killed");
    assert_eq!(err.kind(), ErrorKind::Crashed, "{err}");
    // Whatever it had put arrives whole and in order; then the queue serves others. (The
    // queue's buffer may be full of the killed producer's messages: drain while the
    // survivor puts, or it would wait for room.)
    let mut survivor = Process::spawn(produce, (q.clone(), 1, 100))?;
    let rest = within(LIMIT, "draining after the kill", move || {
        let mut rest = Vec::new();
        while rest.last() != Some(&(1, 99)) {
            match q.get().map_err(|err| err.to_string())? {
                Some(message) => rest.push(message),
                None => return Err("no stop marker was put".to_owned()),
            }
        }
        Ok(rest)
    })??;
    survivor.join()?;
    let doomed_seqs: Vec<u32> = rest.iter().filter(|m| m.0 == 9).map(|m| m.1).collect();
    let expected: Vec<u32> = (1000..1000 + doomed_seqs.len() as u32).collect();
    assert_eq!(
        doomed_seqs, expected,
        "the killed producer's messages, whole and in order"
    );
    let survivor_seqs: Vec<u32> = rest.iter().filter(|m| m.0 == 1).map(|m| m.1).collect();
    assert_eq!(survivor_seqs, (0..100).collect::<Vec<_>>());
    Ok(())
}

fn a_large_message_producer_killed_mid_message() -> TestResult {
    let q = Queue::<(u32, u32, Vec<u8>)>::new()?;
    let doomed = Process::spawn(produce_large_forever, (q.clone(), 7))?;
    let (producer, index, bytes) = q.get()?;
    ensure(
        bytes == support::pattern(producer, index, LARGE),
        "first message intact",
    )?;
    // It is now writing its next 8 MiB message (or blocked putting it).
    doomed.kill();
    drop(doomed);
    let mut survivor = Process::spawn(put_large, (q.clone(), 8, 1))?;
    let (bytes_ok, survivor_seen) = within(LIMIT, "draining after the kill", move || {
        let mut all_intact = true;
        loop {
            let (producer, index, bytes) = q.get().expect("get");
            all_intact &= bytes == support::pattern(producer, index, LARGE);
            if producer == 8 {
                return (all_intact, index);
            }
        }
    })?;
    ensure(bytes_ok, "every message that arrived is intact")?;
    assert_eq!(survivor_seen, 0);
    survivor.join()?;
    Ok(())
}

fn a_consumer_killed_while_waiting_does_not_wedge_the_queue() -> TestResult {
    let q = Queue::<Numbered>::new()?;
    let mut waiting = Process::spawn(take_one, (q.clone(),))?;
    let err = waiting
        .join_timeout(Duration::from_millis(50))
        .expect_err("the queue is empty");
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    waiting.kill();
    assert_eq!(
        waiting.join().expect_err("killed").kind(),
        ErrorKind::Crashed
    );
    q.put(Some((1, 1)))?;
    let mut taker = Process::spawn(take_one, (q.clone(),))?;
    assert_eq!(taker.join()?, Some((1, 1)));
    q.put(Some((2, 2)))?;
    assert_eq!(q.get()?, Some((2, 2)));
    Ok(())
}

fn large_messages_from_several_producers_at_once() -> TestResult {
    const PRODUCERS: u32 = 4;
    const EACH: u32 = 3;
    let q = Queue::<(u32, u32, Vec<u8>)>::new()?;
    let mut producers = (0..PRODUCERS)
        .map(|producer| Process::spawn(put_large, (q.clone(), producer, EACH)))
        .collect::<Result<Vec<_>, _>>()?;
    let seen = within(LIMIT, "12 messages of 8 MiB", move || {
        let mut seen = BTreeSet::new();
        for _ in 0..PRODUCERS * EACH {
            let (producer, index, bytes) = q.get().map_err(|err| err.to_string())?;
            if bytes != support::pattern(producer, index, LARGE) {
                return Err(format!("message {index} of producer {producer} is torn"));
            }
            seen.insert((producer, index));
        }
        Ok(seen)
    })??;
    assert_eq!(seen.len(), (PRODUCERS * EACH) as usize);
    for producer in &mut producers {
        producer.join()?;
    }
    Ok(())
}

fn queues_through_pool_tasks() -> TestResult {
    let pool = Pool::new(2)?;
    let q = Queue::new()?;
    pool.starmap(put_square, (0..20).map(|x| (q.clone(), x)))?;
    let mut squares = (0..20).map(|_| q.get()).collect::<Result<Vec<u64>, _>>()?;
    squares.sort_unstable();
    assert_eq!(squares, (0..20).map(|x| x * x).collect::<Vec<_>>());
    assert_eq!(q.try_get()?, None);
    Ok(())
}

#[multiproc::main]
fn main() {
    support::run(tests![
        every_method_in_one_process,
        four_producers_two_consumers_every_message_once,
        a_producer_killed_mid_stream_does_not_wedge_the_queue,
        a_large_message_producer_killed_mid_message,
        a_consumer_killed_while_waiting_does_not_wedge_the_queue,
        large_messages_from_several_producers_at_once,
        queues_through_pool_tasks,
    ]);
}
