// cargo run --example crash_isolation
//! A `map` over inputs, some of which crash a deliberately buggy parser: deep nesting
//! overflows its stack and kills the process, an input it "cannot happen"s on aborts it,
//! and a bad digit panics. In threads, the first two would take the whole program down. In
//! worker processes, each is an error for that one input: the good results come back, the
//! bad inputs get a clear report, and the pool goes on.

use multiproc::{ErrorKind, Pool, task};

/// Sums the numbers of a nested list such as `[1,[2,3]]`. Buggy on purpose: no depth
/// limit, an abort on a state its author thought impossible, and a panic on bad digits.
fn sum(text: &[u8], at: &mut usize) -> u64 {
    match text.get(*at) {
        Some(b'[') => {
            *at += 1;
            let mut total = 0;
            while text.get(*at) != Some(&b']') {
                total += sum(text, at); // recursion without a depth limit
                if text.get(*at) == Some(&b',') {
                    *at += 1;
                }
            }
            *at += 1;
            total
        }
        Some(b'0'..=b'9') => {
            let start = *at;
            while text.get(*at).is_some_and(u8::is_ascii_digit) {
                *at += 1;
            }
            std::str::from_utf8(&text[start..*at])
                .unwrap()
                .parse::<u64>()
                .unwrap()
        }
        None => {
            eprintln!("parser: unexpected end of input at byte {at}; this cannot happen");
            std::process::abort() // as a C library's assert() would
        }
        Some(other) => panic!("invalid character {:?} at byte {at}", *other as char),
    }
}

#[task]
fn parse(text: String) -> u64 {
    sum(text.as_bytes(), &mut 0)
}

#[multiproc::main]
fn main() -> Result<(), multiproc::Error> {
    let deep = format!("{}1{}", "[".repeat(1_000_000), "]".repeat(1_000_000));
    let inputs = vec![
        "[1,2,3]".to_string(),
        "[[1],[2,[3,4]]]".to_string(),
        deep,
        "[1,2".to_string(),
        "[1,x]".to_string(),
        "[10,20,30]".to_string(),
    ];
    let pool = Pool::new(2)?;
    let mut good = 0;
    for (input, outcome) in inputs.iter().zip(pool.imap(parse, inputs.clone())) {
        let shown: String = input.chars().take(16).collect();
        let shown = if input.len() > 16 {
            format!("{shown}... ({} bytes)", input.len())
        } else {
            shown
        };
        match outcome {
            Ok(total) => {
                good += 1;
                println!("ok       {shown:<32} sum = {total}");
            }
            Err(err) => {
                let what = match err.kind() {
                    ErrorKind::Crashed => "CRASHED",
                    ErrorKind::Panicked => "PANICKED",
                    _ => "FAILED",
                };
                // The whole report: task, item, what happened, signal, the worker's last words.
                let report = err.to_string().replace('\n', "\n         ");
                println!("{what:<8} {shown}\n         {report}");
            }
        }
    }
    println!(
        "{good} of {} inputs parsed; the pool still works: {:?}",
        inputs.len(),
        pool.map(parse, ["[4,5]".to_string()])?
    );
    Ok(())
}
