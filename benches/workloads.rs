//! The workloads of issue 7, one per invocation, each printing one JSON line: the Rust side
//! of `benches/compare.py`, which runs the same workloads in Python interleaved with these.
//!
//! ```text
//! workloads w1    [n=1000000] [workers=2]   map of tiny tasks, default chunking
//! workloads w1p   [n=10000]   [workers=2]   imap, one task per message (chunk size 1)
//! workloads apply [n=2000]    [workers=2]   sequential apply round trips
//! workloads w2    [tasks=64] [ms=25] [workers=2]   CPU-bound speedup over serial
//! workloads w3    [tasks=16] [mib=8] [codec=vec|bytes] [workers=2]   8 MiB in + 8 MiB out
//! workloads w4    [runs=20] -- COMMAND [ARGS...]   whole-process time of COMMAND, run `runs` times
//! workloads rss   [n=10000000] [workers=2]  imap over a long input: parent memory
//! workloads start [runs=20] [workers=2]   W4's parts in-process: Pool::new, first apply, drop
//! ```
//!
//! Every pool workload also takes `spin_us=N` (`PoolBuilder::spin`; default: the pool's).
//!
//! Run without a workload (as `cargo bench --bench workloads` does), it runs each in-process
//! workload once at a small size and prints the lines: a smoke run, not a measurement (its
//! peak RSS, for one, includes the workloads before it).

// Figures for a report: precision past 2^52 items or bytes does not matter here.
#![allow(clippy::cast_precision_loss)]

mod common;

use common::{echo, echo_bytes, payload, spin, spin_cpu, square};
use multiproc::{Chunking, Pool};
use serde_bytes::ByteBuf;
use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

type Fields = Vec<(&'static str, f64)>;

struct Args {
    values: BTreeMap<String, String>,
    command: Vec<String>,
}

impl Args {
    fn parse(words: &[String]) -> Args {
        let split = words.iter().position(|w| w == "--").unwrap_or(words.len());
        let values = words[..split]
            .iter()
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let command = words.get(split + 1..).unwrap_or_default().to_vec();
        Args { values, command }
    }

    fn num(&self, key: &str, default: usize) -> usize {
        self.values.get(key).map_or(default, |v| {
            v.replace('_', "")
                .parse()
                .unwrap_or_else(|_| panic!("{key}={v}: not a number"))
        })
    }

    fn text<'a>(&'a self, key: &str, default: &'a str) -> &'a str {
        self.values.get(key).map_or(default, String::as_str)
    }
}

/// Ends a workload: lets the workers exit cleanly (untimed), so that tools that write their
/// report at exit (valgrind) see the workers' side too.
fn finish(pool: &Pool, fields: Fields) -> Fields {
    pool.join();
    fields
}

fn pool(args: &Args) -> Pool {
    let mut builder = Pool::builder().processes(args.num("workers", 2));
    if let Some(us) = args.values.get("spin_us") {
        let us = us.parse().expect("spin_us: a number of microseconds");
        builder = builder.spin(Duration::from_micros(us));
    }
    let pool = builder.build().expect("starting the pool");
    // Warm-up: every worker has started (`worker_pids` starts those that a short map may not
    // need: a pool asks for its workers as work needs them), run a chunk and sized its
    // buffers.
    let workers = pool.worker_pids().len();
    assert_eq!(workers, pool.processes(), "every worker started");
    let warm = pool.map(square, 0..1000).expect("warm-up map");
    assert_eq!(warm[999], 999 * 999);
    pool
}

fn timed<R>(run: impl FnOnce() -> R) -> (R, f64) {
    let start = Instant::now();
    let out = run();
    (out, start.elapsed().as_secs_f64())
}

fn per_task(n: usize, seconds: f64) -> Fields {
    vec![
        ("n", n as f64),
        ("seconds", seconds),
        ("per_task_us", seconds * 1e6 / n as f64),
    ]
}

fn w1(args: &Args) -> Fields {
    let n = args.num("n", 1_000_000);
    let pool = pool(args);
    let (out, seconds) = timed(|| pool.map(square, 0..n as u64).expect("map"));
    assert_eq!(out.len(), n);
    finish(&pool, per_task(n, seconds))
}

fn w1p(args: &Args) -> Fields {
    let n = args.num("n", 10_000);
    let pool = pool(args);
    let (sum, seconds) = timed(|| {
        pool.with_chunking(Chunking::Fixed(1))
            .imap(square, 0..n as u64)
            .try_fold(0u64, |sum, x| x.map(|x| sum.wrapping_add(x)))
            .expect("imap")
    });
    std::hint::black_box(sum);
    finish(&pool, per_task(n, seconds))
}

fn apply(args: &Args) -> Fields {
    let n = args.num("n", 2_000);
    let pool = pool(args);
    let ((), seconds) = timed(|| {
        for i in 0..n as u64 {
            assert_eq!(pool.apply(square, (i,)).expect("apply"), i * i);
        }
    });
    finish(&pool, per_task(n, seconds))
}

fn w2(args: &Args) -> Fields {
    let tasks = args.num("tasks", 64);
    let ms = args.num("ms", 25) as u64;
    let pool = pool(args);
    let ((), serial) = timed(|| {
        for _ in 0..tasks {
            std::hint::black_box(spin_cpu(Duration::from_millis(ms)));
        }
    });
    let (out, parallel) = timed(|| pool.map(spin, vec![ms; tasks]).expect("map"));
    assert_eq!(out.len(), tasks);
    let fields = vec![
        ("tasks", tasks as f64),
        ("workers", pool.processes() as f64),
        ("serial_s", serial),
        ("parallel_s", parallel),
        ("speedup", serial / parallel),
    ];
    finish(&pool, fields)
}

fn w3(args: &Args) -> Fields {
    let tasks = args.num("tasks", 16);
    let len = args.num("mib", 8) << 20;
    let pool = pool(args);
    let template = payload(len);
    let seconds = match args.text("codec", "vec") {
        "vec" => {
            pool.map(echo, vec![template.clone(); 2]).expect("warm-up");
            let inputs = vec![template.clone(); tasks];
            let (out, seconds) = timed(|| pool.map(echo, inputs).expect("map"));
            assert!(out.iter().all(|o| o.len() == len));
            seconds
        }
        "bytes" => {
            let buf = ByteBuf::from(template.clone());
            pool.map(echo_bytes, vec![buf.clone(); 2]).expect("warm-up");
            let inputs = vec![buf; tasks];
            let (out, seconds) = timed(|| pool.map(echo_bytes, inputs).expect("map"));
            assert!(out.iter().all(|o| o.len() == len));
            seconds
        }
        other => panic!("codec={other}: expected vec or bytes"),
    };
    // Both directions count: each task moves `len` bytes in and `len` bytes out.
    let mib = (2 * tasks * len) as f64 / f64::from(1 << 20);
    finish(
        &pool,
        vec![
            ("tasks", tasks as f64),
            ("seconds", seconds),
            ("mib_s", mib / seconds),
        ],
    )
}

fn w4(args: &Args) -> Fields {
    let runs = args.num("runs", 20);
    let (program, rest) = args.command.split_first().expect("w4 needs -- COMMAND");
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let (status, seconds) = timed(|| {
                Command::new(program)
                    .args(rest)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .status()
                    .expect("running the command")
            });
            assert!(status.success(), "{program} failed: {status}");
            seconds * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    vec![
        ("runs", runs as f64),
        ("ms", times[runs / 2]),
        ("min_ms", times[0]),
    ]
}

fn rss(args: &Args) -> Fields {
    let n = args.num("n", 10_000_000);
    let pool = pool(args);
    let (before, _) = memory();
    let (sum, seconds) = timed(|| {
        pool.imap(square, 0..n as u64)
            .try_fold(0u64, |sum, x| x.map(|x| sum.wrapping_add(x)))
            .expect("imap")
    });
    std::hint::black_box(sum);
    let (after, peak) = memory();
    let mib = |bytes: u64| bytes as f64 / f64::from(1 << 20);
    let mut fields = per_task(n, seconds);
    fields.extend([
        ("rss_before_mib", mib(before)),
        ("rss_after_mib", mib(after)),
        ("peak_mib", mib(peak)),
    ]);
    finish(&pool, fields)
}

/// W4 from the inside: how a pool's life splits into start (every worker spawned and past its
/// handshake), the first task, and the drop (workers killed and reaped). Medians of `runs`.
fn start(args: &Args) -> Fields {
    let runs = args.num("runs", 20);
    let workers = args.num("workers", 2);
    let mut parts = [Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..runs {
        let (pool, new) = timed(|| Pool::new(workers).expect("starting the pool"));
        let (out, first) = timed(|| pool.apply(square, (7,)).expect("apply"));
        assert_eq!(out, 49);
        let ((), dropped) = timed(|| drop(pool));
        for (part, seconds) in parts.iter_mut().zip([new, first, dropped]) {
            part.push(seconds * 1e3);
        }
    }
    let median = |part: &mut Vec<f64>| {
        part.sort_by(f64::total_cmp);
        part[part.len() / 2]
    };
    vec![
        ("runs", runs as f64),
        ("new_ms", median(&mut parts[0])),
        ("first_apply_ms", median(&mut parts[1])),
        ("drop_ms", median(&mut parts[2])),
    ]
}

fn run(name: &str, args: &Args) -> Fields {
    match name {
        "w1" => w1(args),
        "w1p" => w1p(args),
        "apply" => apply(args),
        "w2" => w2(args),
        "w3" => w3(args),
        "w4" => w4(args),
        "rss" => rss(args),
        "start" => start(args),
        other => panic!("unknown workload {other:?}: see the doc comment of benches/workloads.rs"),
    }
}

fn print_json(name: &str, fields: &Fields) {
    let body: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("\"{k}\": {v}"))
        .collect();
    println!("{{\"workload\": \"{name}\", {}}}", body.join(", "));
}

#[multiproc::main]
fn main() {
    let words: Vec<String> = std::env::args().skip(1).collect();
    match words.first().map(String::as_str) {
        Some(name) if !name.starts_with('-') => {
            let args = Args::parse(&words[1..]);
            print_json(name, &run(name, &args));
        }
        // `cargo bench` passes `--bench`: a quick smoke run of every in-process workload.
        _ => {
            for (name, sizes) in [
                ("w1", "n=100000"),
                ("w1p", "n=2000"),
                ("apply", "n=500"),
                ("w2", "tasks=8"),
                ("w3", "tasks=4"),
                ("w3", "tasks=4 codec=bytes"),
                ("rss", "n=1000000"),
                ("start", "runs=5"),
            ] {
                let words: Vec<String> = sizes.split(' ').map(str::to_owned).collect();
                print_json(name, &run(name, &Args::parse(&words)));
            }
        }
    }
}

/// This process's resident and peak resident memory, in bytes, from `/proc/self/status`.
pub fn memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map_or(0, |kib| kib * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}
