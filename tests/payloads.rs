//! Large payloads and the shared memory they travel in: arguments and results at and around
//! the frame limit and the region threshold, intact; forged frames and scribbled regions are
//! errors; a task cannot resize the regions or outrun its deadline by scribbling on its
//! status page; and one large frame does not pin its memory in the parent or the worker.
//! The tests run one at a time: some measure this process's memory.

mod support;

use multiproc::{Chunking, ErrorKind, Pool, Process, task};
use serde_bytes::ByteBuf;
use std::time::Duration;
use support::{TestResult, ensure, within};

const LIMIT: Duration = Duration::from_mins(1);

#[task]
fn echo(x: u64) -> u64 {
    x
}

#[task]
fn bytes(len: usize) -> ByteBuf {
    ByteBuf::from(vec![7u8; len])
}

#[task]
fn length(data: ByteBuf) -> usize {
    data.len()
}

#[task]
fn reversed(data: ByteBuf) -> ByteBuf {
    ByteBuf::from(data.into_vec().into_iter().rev().collect::<Vec<u8>>())
}

#[task]
fn patterned_of(len: usize, salt: u8) -> ByteBuf {
    ByteBuf::from(support::patterned(len, salt))
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// The worker's resident memory, in KiB.
#[task]
fn worker_rss_kib() -> u64 {
    status_kib("VmRSS:")
}

/// Descriptors open in the worker.
#[task]
fn worker_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count)
}

fn parent_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count)
}

/// The worker's memfds (path, descriptor number).
fn memfds(name: &str) -> Vec<(String, i32)> {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let to = std::fs::read_link(entry.path()).ok()?;
            let to = to.to_string_lossy().into_owned();
            let fd = entry.file_name().to_str()?.parse().ok()?;
            to.contains(name).then_some((to, fd))
        })
        .collect()
}

/// Tries to resize every shared memfd of this worker (regions and status page): how many
/// of them could be resized.
#[task]
fn resize_memfds() -> (usize, usize) {
    let mut found = 0;
    let mut resized = 0;
    for (_, fd) in memfds("multiproc-") {
        found += 1;
        let path = format!("/proc/self/fd/{fd}");
        let Ok(file) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
        else {
            continue;
        };
        let len = file.metadata().map_or(0, |m| m.len());
        if file.set_len(0).is_ok() || file.set_len(len + (1 << 20)).is_ok() {
            resized += 1;
        }
    }
    (found, resized)
}

fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

/// Fills every region of this worker with `fill` through /proc/self/fd, then announces a
/// shared frame of `len` bytes (n = `n`) on the channel.
#[task]
fn scribble_and_forge(fill: Vec<u8>, n: u64, len: u64) -> u8 {
    use std::os::unix::fs::FileExt;
    for (_, fd) in memfds("multiproc-region") {
        let region = std::fs::OpenOptions::new()
            .write(true)
            .open(format!("/proc/self/fd/{fd}"))
            .expect("open region");
        let size = region.metadata().unwrap().len() as usize;
        let mut data = Vec::with_capacity(size);
        while data.len() < size {
            data.extend_from_slice(&fill);
        }
        data.truncate(size);
        region.write_all_at(&data, 0).expect("write region");
    }
    let mut body = vec![7];
    body.extend(varint(n));
    body.extend(varint(len));
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&body);
    support::write_raw_frame(&frame);
    0
}

/// `len` bytes of `ch` as a `String`; first starts a thread that, once the reply is in the
/// worker's replies region, flips the string's last byte there between `ch` and 0xFF (not
/// UTF-8) for 50 ms, while the parent decodes it.
#[task]
fn scribble_own_reply(len: usize, ch: u8) -> String {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("maps");
    let (start, end) = maps
        .lines()
        .find(|line| line.contains("multiproc-region"))
        .and_then(|line| {
            let (a, b) = line.split_whitespace().next()?.split_once('-')?;
            Some((
                usize::from_str_radix(a, 16).ok()?,
                usize::from_str_radix(b, 16).ok()?,
            ))
        })
        .expect("a replies region");
    std::thread::spawn(move || {
        let base = start as *mut u8;
        let window = len..(len + 64).min(end - start);
        let until = std::time::Instant::now() + Duration::from_millis(50);
        // SAFETY: within this worker's own replies mapping, scribbled on on purpose.
        unsafe {
            let last = loop {
                if std::time::Instant::now() > until {
                    return;
                }
                if let Some(at) = window
                    .clone()
                    .rev()
                    .find(|&at| base.add(at).read_volatile() == ch)
                {
                    break at;
                }
                std::hint::spin_loop();
            };
            while std::time::Instant::now() < until {
                for _ in 0..1000 {
                    base.add(last).write_volatile(0xFF);
                    base.add(last).write_volatile(ch);
                }
            }
        }
    });
    String::from_utf8(vec![ch; len]).expect("ASCII")
}

/// The parent decodes a reply from a copy of the replies region, never in place: a task
/// that scribbles on the region while the parent decodes (a thread it left, native code
/// gone wrong) gets a `Codec` error or its bytes, and can never leave the parent holding a
/// `String` that is not UTF-8 (checked, then copied from bytes that changed in between).
fn a_task_scribbling_on_its_reply_cannot_break_a_string_in_the_parent() -> TestResult {
    let pool = Pool::new(1)?;
    let len = 1 << 20;
    // A large reply through the socket first: the next ones get a replies region.
    ensure(pool.apply(bytes, (len,))?.len() == len, "first")?;
    for attempt in 0..40 {
        match pool.apply(scribble_own_reply, (len, b'q')) {
            Ok(text) => ensure(
                std::str::from_utf8(text.as_bytes()).is_ok(),
                format!("attempt {attempt}: the parent holds a String that is not UTF-8"),
            )?,
            Err(err) => ensure(err.kind() == ErrorKind::Codec, err.to_string())?,
        }
    }
    Ok(())
}

/// The worker's address space, in KiB.
#[task]
fn worker_vm_kib() -> u64 {
    status_kib("VmSize:")
}

/// Whether `len` more bytes can be allocated in the worker now.
#[task]
fn can_allocate(len: usize) -> bool {
    let mut v: Vec<u8> = Vec::new();
    v.try_reserve_exact(len).is_ok()
}

#[task]
fn region_count() -> usize {
    memfds("multiproc-region").len()
}

/// After a result of 256 MiB has come back, the worker that produced it does not keep the
/// memory it encoded it in.
fn a_worker_gives_back_the_memory_of_a_large_result() -> TestResult {
    let pool = Pool::new(1)?;
    let pid = pool.worker_pids();
    let before = pool.apply(worker_rss_kib, ())?;
    let big = pool.apply(bytes, (256 << 20,))?;
    ensure(big.len() == 256 << 20, "intact")?;
    drop(big);
    for _ in 0..3 {
        pool.apply(echo, (1,))?;
    }
    let after = pool.apply(worker_rss_kib, ())?;
    ensure(pool.worker_pids() == pid, "same worker")?;
    ensure(
        after < before + (64 << 10),
        format!("worker RSS before {before} KiB, after {after} KiB"),
    )
}

/// Nor does the parent keep the buffer it read it into.
fn the_parent_gives_back_the_memory_of_a_large_result() -> TestResult {
    let pool = Pool::new(1)?;
    pool.apply(echo, (1,))?;
    let before = support::rss_kib();
    let big = pool.apply(bytes, (256 << 20,))?;
    ensure(big.len() == 256 << 20, "intact")?;
    drop(big);
    for _ in 0..3 {
        pool.apply(echo, (1,))?;
    }
    let after = support::rss_kib();
    ensure(
        after < before + (64 << 10),
        format!("parent RSS before {before} KiB, after {after} KiB"),
    )
}

/// A frame limit too small for the start-up handshake is raised to what it needs: the pool
/// starts and runs (with either start method).
fn a_tiny_frame_limit_is_raised_to_what_the_handshake_needs() -> TestResult {
    for limit in [0u32, 4, 8, 16, 32, 64] {
        let out = within(LIMIT, "tiny limit", move || {
            let pool = Pool::builder().processes(1).max_frame_len(limit).build()?;
            pool.apply(echo, (1,))
        })?;
        ensure(matches!(&out, Ok(1)), format!("limit {limit}: {out:?}"))?;
    }
    Ok(())
}

fn regions_and_status_page_cannot_be_resized_by_a_task() -> TestResult {
    let pool = Pool::new(1)?;
    let big = ByteBuf::from(support::patterned(2 << 20, 1));
    assert_eq!(pool.apply(reversed, (big.clone(),))?.len(), big.len());
    assert_eq!(pool.apply(reversed, (big.clone(),))?.len(), big.len());
    let (found, resized) = pool.apply(resize_memfds, ())?;
    ensure(found >= 2, format!("found {found} memfds"))?;
    ensure(resized == 0, format!("{resized} of {found} memfds resized"))?;
    assert_eq!(pool.apply(reversed, (big.clone(),))?.len(), big.len());
    Ok(())
}

fn garbage_in_regions_with_forged_frame_is_codec() -> TestResult {
    let pool = std::sync::Arc::new(Pool::new(1)?);
    let big = ByteBuf::from(support::patterned(2 << 20, 1));
    for _ in 0..3 {
        assert_eq!(pool.apply(reversed, (big.clone(),))?.len(), big.len());
    }
    ensure(pool.apply(region_count, ())? == 2, "two regions")?;
    for (fill, len) in [
        (vec![0xffu8], 1u64 << 20),
        (vec![0x10, 0, 0, 0, 4, 0, 0, 0], 1 << 20),
        (vec![0x00], 1 << 20),
        (vec![0x05, 0, 0, 0, 5, 1, 0, 1, 0], 1 << 20),
    ] {
        // Regions again (the worker may have been replaced).
        for _ in 0..2 {
            assert_eq!(pool.apply(reversed, (big.clone(),))?.len(), big.len());
        }
        let res = within(LIMIT, "forged", {
            let pool = std::sync::Arc::clone(&pool);
            move || pool.apply(scribble_and_forge, (fill, 1 << 40, len))
        })?;
        ensure(
            matches!(&res, Err(e) if e.kind() == ErrorKind::Codec),
            format!("{res:?}"),
        )?;
    }
    assert_eq!(pool.apply(reversed, (big.clone(),))?.len(), big.len());
    Ok(())
}

/// Many calls with frames of 256 KiB and more (regions made, grown, replaced) leak no
/// descriptor, in the parent or in the worker (one worker: the same one is counted).
fn descriptors_do_not_leak_over_many_large_calls() -> TestResult {
    let pool = Pool::new(1)?;
    pool.map(echo, 0..10)?;
    let before = parent_fds();
    let wbefore = pool.apply(worker_fds, ())?;
    for round in 0..30usize {
        let len = (256 << 10) + round * (200 << 10);
        let data = ByteBuf::from(support::patterned(len, round as u8));
        let out = pool
            .with_chunking(Chunking::Fixed(1))
            .map(reversed, vec![data.clone(), data.clone(), data.clone()])?;
        let mut expected = data.to_vec();
        expected.reverse();
        ensure(
            out.iter().all(|d| **d == expected),
            format!("round {round}"),
        )?;
    }
    let after = parent_fds();
    let wafter = pool.apply(worker_fds, ())?;
    ensure(
        after <= before + 4,
        format!("parent fds {before} -> {after}"),
    )?;
    // Its two regions, at most.
    ensure(
        wafter <= wbefore + 2,
        format!("worker fds {wbefore} -> {wafter}"),
    )
}

fn results_at_and_around_the_frame_limit() -> TestResult {
    let limit = 1u32 << 20;
    let pool = Pool::builder().processes(1).max_frame_len(limit).build()?;
    // Results, then arguments, from 40 bytes under the limit to the limit: those that fit
    // arrive intact, the others are Codec errors, and some fit.
    let mut fits = 0;
    for len in ((limit as usize) - 40)..=(limit as usize) {
        match pool.apply(bytes, (len,)) {
            Ok(data) => {
                ensure(data.len() == len && data.iter().all(|&b| b == 7), "intact")?;
                fits = len;
            }
            Err(err) => ensure(err.kind() == ErrorKind::Codec, err.to_string())?,
        }
    }
    ensure(fits > 0, "a result just under the limit fits")?;
    let mut fits = 0;
    for len in ((limit as usize) - 40)..=(limit as usize) {
        match pool.apply(length, (ByteBuf::from(vec![3u8; len]),)) {
            Ok(n) => {
                ensure(n == len, "len")?;
                fits = len;
            }
            Err(err) => ensure(err.kind() == ErrorKind::Codec, err.to_string())?,
        }
    }
    ensure(fits > 0, "an argument just under the limit fits")
}

/// A worker writes a reply straight into its replies region while the parent is done with
/// it: replies that outgrow the region (which then grows), shrink again, or are too small
/// for it (then sent through the socket from there) all arrive intact, in turn.
fn replies_that_outgrow_their_region_arrive_intact() -> TestResult {
    let pool = Pool::new(1)?;
    let sizes = [
        300 << 10,
        1 << 20,
        10,
        4 << 20,
        300 << 10,
        (4 << 20) + 1,
        8 << 20,
        100,
        (300 << 10) - 1,
    ];
    for (round, &len) in sizes.iter().enumerate() {
        let salt = round as u8;
        let out = pool.apply(patterned_of, (len, salt))?;
        ensure(
            *out == support::patterned(len, salt),
            format!("reply {round} of {len} bytes"),
        )?;
    }
    Ok(())
}

fn many_large_results_with_prefetch() -> TestResult {
    let pool = Pool::new(2)?;
    for round in 0..3u8 {
        let sizes: Vec<usize> = (0..200).map(|i| 1000 + (i * 7919) % (300 << 10)).collect();
        let out: Vec<_> = pool
            .with_chunking(Chunking::Fixed(3))
            .imap(patterned_of_pair, sizes.iter().map(|&l| (l, round)))
            .collect();
        for (i, (r, &len)) in out.into_iter().zip(&sizes).enumerate() {
            let r = r?;
            ensure(
                *r == support::patterned(len, round),
                format!("round {round} item {i}"),
            )?;
        }
    }
    Ok(())
}

#[task]
fn patterned_of_pair(arg: (usize, u8)) -> ByteBuf {
    ByteBuf::from(support::patterned(arg.0, arg.1))
}

fn process_large_args_and_outputs() -> TestResult {
    for len in [(256 << 10) - 1, 256 << 10, 40 << 20] {
        let data = ByteBuf::from(support::patterned(len, 9));
        let mut p = Process::spawn(reversed, (data.clone(),))?;
        let out = within(LIMIT, "process", move || p.join())??;
        let mut expected = data.to_vec();
        expected.reverse();
        ensure(*out == expected, format!("len {len}"))?;
    }
    Ok(())
}

/// Under a memory cap of 1 GiB, a worker may allocate as much after `large` (a call that
/// moves a large frame through it) as before.
fn leaves_later_tasks_their_memory(
    what: &str,
    large: impl FnOnce(&Pool) -> TestResult,
) -> TestResult {
    const CAP: u64 = 1 << 30;
    let pool = Pool::builder()
        .processes(1)
        .max_memory_per_child(CAP)
        .build()?;
    let pid = pool.worker_pids();
    let vm = pool.apply(worker_vm_kib, ())? << 10;
    // What a fresh worker may still allocate, less a margin of 64 MiB.
    let room = usize::try_from(CAP - vm)? - (64 << 20);
    ensure(
        pool.apply(can_allocate, (room,))?,
        "a fresh worker can allocate it",
    )?;
    large(&pool)?;
    ensure(pool.worker_pids() == pid, "same worker")?;
    ensure(
        pool.apply(can_allocate, (room,))?,
        format!("after {what}, the same worker may allocate as much"),
    )
}

fn a_large_result_leaves_later_tasks_their_memory() -> TestResult {
    leaves_later_tasks_their_memory("a 256 MiB result", |pool| {
        let big = pool.apply(bytes, (256 << 20,))?;
        ensure(big.len() == 256 << 20, "intact")
    })
}

/// A large argument, which under a memory cap travels through the socket (regions are
/// capped at an eighth of it).
fn a_large_argument_leaves_later_tasks_their_memory() -> TestResult {
    leaves_later_tasks_their_memory("a 200 MiB argument", |pool| {
        let n = pool.apply(length, (ByteBuf::from(vec![1u8; 200 << 20]),))?;
        ensure(n == 200 << 20, "intact")
    })
}

/// Fills this worker's status page with `fill` (through /proc/self/fd); with `half_frame`,
/// also writes the first bytes of a frame to its channel; then works for two minutes.
#[task]
fn scribble_status_then_work(fill: u8, half_frame: bool) -> u8 {
    use std::os::unix::fs::FileExt;
    for (_, fd) in memfds("multiproc-status") {
        let page = std::fs::OpenOptions::new()
            .write(true)
            .open(format!("/proc/self/fd/{fd}"))
            .expect("open status page");
        let len = page.metadata().expect("status page size").len();
        page.write_all_at(&vec![fill; len as usize], 0)
            .expect("write status page");
    }
    if half_frame {
        // A length of 64 bytes, and one of them.
        let mut partial = 64u32.to_le_bytes().to_vec();
        partial.push(0);
        support::write_raw_frame(&partial);
    }
    std::thread::sleep(Duration::from_mins(2));
    0
}

/// A task past its deadline is killed, whatever it wrote into its status page, and even
/// when it left a frame half written on its channel.
fn garbage_in_the_status_page_does_not_defeat_a_deadline() -> TestResult {
    for half_frame in [false, true] {
        let pool = Pool::new(1)?;
        let res = within(
            Duration::from_secs(30),
            "a task with a 1 s deadline",
            move || {
                pool.with_timeout(Duration::from_secs(1))
                    .apply(scribble_status_then_work, (0xff, half_frame))
            },
        )?;
        ensure(
            matches!(&res, Err(e) if e.kind() == ErrorKind::Timeout),
            format!("half frame {half_frame}: {res:?}"),
        )?;
    }
    Ok(())
}

/// Bytes on the wire, their count alone once decoded: a large argument whose task takes no
/// time.
struct Blob(usize);

impl serde::Serialize for Blob {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&vec![0u8; self.0])
    }
}

impl<'de> serde::Deserialize<'de> for Blob {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Count;
        impl serde::de::Visitor<'_> for Count {
            type Value = Blob;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Blob, E> {
                Ok(Blob(v.len()))
            }
        }
        d.deserialize_bytes(Count)
    }
}

#[task]
fn blob_len(blob: Blob) -> usize {
    blob.0
}

/// A deadline counts from the item's start: an argument that takes longer than the deadline
/// (and the parent's own margin) to arrive through the socket (under a memory cap, which
/// keeps it out of the shared regions) does not time its task out.
fn a_deadline_does_not_count_an_argument_in_transit() -> TestResult {
    let pool = Pool::builder()
        .processes(1)
        .max_memory_per_child(4 << 30)
        .build()?;
    let len = 900usize << 20;
    let out = within(Duration::from_mins(2), "a 900 MiB argument", move || {
        pool.with_timeout(Duration::from_millis(200))
            .apply(blob_len, (Blob(len),))
    })?;
    ensure(
        out.as_ref().is_ok_and(|&n| n == len),
        format!("{:?}", out.map_err(|err| err.to_string())),
    )
}

#[multiproc::main]
fn main() {
    support::run_one_at_a_time(tests![
        a_worker_gives_back_the_memory_of_a_large_result,
        the_parent_gives_back_the_memory_of_a_large_result,
        a_tiny_frame_limit_is_raised_to_what_the_handshake_needs,
        regions_and_status_page_cannot_be_resized_by_a_task,
        garbage_in_regions_with_forged_frame_is_codec,
        descriptors_do_not_leak_over_many_large_calls,
        results_at_and_around_the_frame_limit,
        many_large_results_with_prefetch,
        process_large_args_and_outputs,
        a_large_result_leaves_later_tasks_their_memory,
        a_large_argument_leaves_later_tasks_their_memory,
        garbage_in_the_status_page_does_not_defeat_a_deadline,
        a_deadline_does_not_count_an_argument_in_transit,
        a_task_scribbling_on_its_reply_cannot_break_a_string_in_the_parent,
        replies_that_outgrow_their_region_arrive_intact,
    ]);
}
