//! The last lines of the daemon's own log, kept in memory for the fleet agent's
//! `log-upload`. Every line the log writer emits to stderr is also appended here (at most
//! [`MAX_LINES`] lines of at most [`MAX_LINE_BYTES`] bytes each). The log carries no patient
//! data by the project's rules (peers, random object ids, counts), so neither does this.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Mutex, OnceLock};

/// `log-upload`'s largest `lines` (`gateway_fleet::command::MAX_LOG_LINES`).
pub const MAX_LINES: usize = 10_000;
/// Longer lines are cut (on a character boundary) and marked.
pub const MAX_LINE_BYTES: usize = 2048;

static RING: OnceLock<Mutex<VecDeque<String>>> = OnceLock::new();

fn ring() -> &'static Mutex<VecDeque<String>> {
    RING.get_or_init(|| Mutex::new(VecDeque::with_capacity(1024)))
}

/// The last `n` lines, oldest first.
pub fn tail(n: usize) -> Vec<String> {
    let ring = ring().lock().unwrap_or_else(|p| p.into_inner());
    let skip = ring.len().saturating_sub(n);
    ring.iter().skip(skip).cloned().collect()
}

fn push_line(line: &str) {
    let line = line.trim_end_matches('\r');
    if line.is_empty() {
        return;
    }
    let kept = if line.len() > MAX_LINE_BYTES {
        let mut end = MAX_LINE_BYTES;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        format!("{} [cut]", line.get(..end).unwrap_or_default())
    } else {
        line.to_owned()
    };
    let mut ring = ring().lock().unwrap_or_else(|p| p.into_inner());
    if ring.len() == MAX_LINES {
        ring.pop_front();
    }
    ring.push_back(kept);
}

/// A writer for the log formatter: everything goes to stderr, and each complete line also
/// into the ring when the writer is dropped (the formatter writes one event per writer).
#[derive(Debug, Default)]
pub struct TeeWriter {
    pending: Vec<u8>,
}

impl Write for TeeWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = io::stderr().write(buf)?;
        self.pending
            .extend_from_slice(buf.get(..n).unwrap_or_default());
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

impl Drop for TeeWriter {
    fn drop(&mut self) {
        let text = String::from_utf8_lossy(&self.pending);
        for line in text.split('\n') {
            push_line(line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_kept_in_order_bounded_and_cut() {
        {
            let mut w = TeeWriter::default();
            w.write_all(b"logring-test one\nlogring-test two\n")
                .unwrap();
        }
        push_line(&"x".repeat(MAX_LINE_BYTES + 10));
        let last = tail(3);
        assert_eq!(last[0], "logring-test one");
        assert_eq!(last[1], "logring-test two");
        assert!(last[2].ends_with(" [cut]") && last[2].len() == MAX_LINE_BYTES + 6);
        for i in 0..MAX_LINES + 5 {
            push_line(&format!("filler {i}"));
        }
        let all = tail(usize::MAX);
        assert_eq!(all.len(), MAX_LINES);
        assert_eq!(
            all.last().map(String::as_str),
            Some(format!("filler {}", MAX_LINES + 4).as_str())
        );
    }
}
