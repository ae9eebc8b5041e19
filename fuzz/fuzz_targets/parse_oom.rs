//! Every allocation-failure path of a small parser ends in a clean error:
//! for each input, the parser's allocations are counted, then each one is
//! made to fail in turn with `pymalloc::inject`. An infallible allocation
//! left in the parser (a `push` without `try_reserve`, a `to_string`)
//! would abort the process on its failure, and the fuzzer report it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pymalloc::PyMalloc;
use std::collections::TryReserveError;

#[global_allocator]
static ALLOC: PyMalloc = PyMalloc::system();

#[derive(Debug, PartialEq)]
enum Error {
    /// Line `n` (from 0) is not `name: number, number, ...`.
    Syntax(usize),
    OutOfMemory,
}

impl From<TryReserveError> for Error {
    fn from(_: TryReserveError) -> Self {
        Error::OutOfMemory
    }
}

/// One `name: 1, -2, 3` record per line.
type Records = Vec<(String, Vec<i64>)>;

fn parse(text: &[u8]) -> Result<Records, Error> {
    let mut records = Records::new();
    for (n, line) in text.split(|&b| b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or(Error::Syntax(n))?;
        let (name, rest) = (&line[..colon], &line[colon + 1..]);
        if name.is_empty() || !name.iter().all(u8::is_ascii_alphanumeric) {
            return Err(Error::Syntax(n));
        }
        let mut key = String::new();
        key.try_reserve_exact(name.len())?;
        key.extend(name.iter().map(|&b| b as char));
        let mut values = Vec::new();
        for field in rest.split(|&b| b == b',') {
            let field = std::str::from_utf8(field).map_err(|_| Error::Syntax(n))?;
            let value = field.trim().parse::<i64>().map_err(|_| Error::Syntax(n))?;
            values.try_reserve(1)?;
            values.push(value);
        }
        records.try_reserve(1)?;
        records.push((key, values));
    }
    Ok(records)
}

fuzz_target!(|data: &[u8]| {
    let (expected, points) = ALLOC.count_allocations(|| parse(data));
    // Long inputs have thousands of failure points: the first and last
    // hundred each, and every allocation of short inputs.
    for n in (1..=points).filter(|&n| n <= 100 || n + 100 > points) {
        let (result, failed) = ALLOC.fail_nth(n, || parse(data));
        assert!(failed);
        match (&result, &expected) {
            (Err(Error::OutOfMemory), _) => {}
            // A syntax error found before the failing allocation.
            (Err(Error::Syntax(_)), Err(Error::Syntax(_))) => assert_eq!(result, expected),
            _ => panic!("allocation #{n} of {points} failed, yet the parse gave {result:?}"),
        }
    }
});
