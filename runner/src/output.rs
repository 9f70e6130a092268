//! A job's output: stdout/stderr bytes become log chunks, and lines in the progress syntax
//! become progress events instead.
//!
//! # Progress syntax
//! A line (ending in `\n`, an optional `\r` before it) of the form
//!
//! ```text
//! ::progress PERCENT[ STAGE]::[MESSAGE]
//! ```
//!
//! where PERCENT is an integer 0..=100 (a trailing `%` is allowed), STAGE is free text up to
//! 128 bytes and MESSAGE free text up to 1024 bytes (longer ones are cut at a character
//! boundary). Examples: `::progress 40 loading data::`, `::progress 75 upload::3 of 4 files`.
//! Such a line is reported as a progress event and is not stored as log output; a line that
//! starts like one but does not parse (say `::progress lots::`) stays in the log unchanged.
//! Only a whole line counts: the syntax must start at the beginning of a line.
use gantry_proto as pb;

/// What a line starts with to be a progress line.
const PREFIX: &[u8] = b"::progress ";
/// A partial line that may still become a progress line is held back at most this long.
const MAX_PROGRESS_LINE: usize = 2048;
const MAX_STAGE: usize = 128;
const MAX_MESSAGE: usize = 1024;

/// A piece of output, in the order it was produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    /// Log bytes at `offset` of the stream (offsets count stored bytes only).
    Log { offset: u64, data: Vec<u8> },
    /// A progress line.
    Progress(pb::Progress),
}

/// One output stream of one attempt.
#[derive(Debug, Default)]
pub struct OutputStream {
    /// Bytes stored so far (the next log offset).
    offset: u64,
    /// The start of a line that may become a progress line, held until it ends.
    held: Vec<u8>,
    /// Whether the next byte starts a line.
    mid_line: bool,
}

impl OutputStream {
    /// Feeds bytes; returns the pieces they complete.
    pub fn feed(&mut self, data: &[u8]) -> Vec<Piece> {
        let mut out = Vec::new();
        let mut log = Vec::new();
        let mut rest = data;
        while !rest.is_empty() {
            if self.mid_line {
                // Inside an ordinary line: everything up to its end is log.
                match rest.iter().position(|&b| b == b'\n') {
                    Some(i) => {
                        log.extend_from_slice(&rest[..=i]);
                        rest = &rest[i + 1..];
                        self.mid_line = false;
                    }
                    None => {
                        log.extend_from_slice(rest);
                        rest = &[];
                    }
                }
                continue;
            }
            // At (or held at) the start of a line.
            let end = rest.iter().position(|&b| b == b'\n');
            let take = end.map_or(rest.len(), |i| i + 1);
            self.held.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if end.is_some() {
                let line = std::mem::take(&mut self.held);
                match parse_progress(&line) {
                    Some(p) => {
                        self.flush_log(&mut log, &mut out);
                        out.push(Piece::Progress(p));
                    }
                    None => log.extend_from_slice(&line),
                }
            } else if !could_be_progress(&self.held) {
                log.append(&mut self.held);
                self.mid_line = true;
            }
        }
        self.flush_log(&mut log, &mut out);
        out
    }

    /// Whether the next byte starts a line (nothing of a line is stored or held).
    pub fn at_line_start(&self) -> bool {
        !self.mid_line && self.held.is_empty()
    }

    /// The stream ended: whatever is held is log (or a progress line without its newline).
    pub fn finish(&mut self) -> Vec<Piece> {
        let line = std::mem::take(&mut self.held);
        let mut out = Vec::new();
        if let Some(p) = parse_progress(&line) {
            out.push(Piece::Progress(p));
        } else {
            let mut log = line;
            self.flush_log(&mut log, &mut out);
        }
        out
    }

    fn flush_log(&mut self, log: &mut Vec<u8>, out: &mut Vec<Piece>) {
        if log.is_empty() {
            return;
        }
        let data = std::mem::take(log);
        let offset = self.offset;
        self.offset += data.len() as u64;
        out.push(Piece::Log { offset, data });
    }
}

/// Whether a line start (no newline yet) may still turn out to be a progress line.
fn could_be_progress(start: &[u8]) -> bool {
    start.len() <= MAX_PROGRESS_LINE && (PREFIX.starts_with(start) || start.starts_with(PREFIX))
}

/// Parses one line (with or without its line ending) in the progress syntax.
pub fn parse_progress(line: &[u8]) -> Option<pb::Progress> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    // The same limit as for a line held back across reads, so that how output happens to be
    // split into reads never changes what is progress.
    if line.len() > MAX_PROGRESS_LINE {
        return None;
    }
    let body = std::str::from_utf8(line.strip_prefix(PREFIX)?).ok()?;
    let (head, message) = body.split_once("::")?;
    let head = head.trim();
    let (percent, stage) = head.split_once(' ').unwrap_or((head, ""));
    let digits = percent.strip_suffix('%').unwrap_or(percent);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let percent: u32 = digits.parse().ok()?;
    if percent > 100 {
        return None;
    }
    Some(pb::Progress {
        percent,
        stage: cut(stage.trim(), MAX_STAGE),
        message: cut(message.trim(), MAX_MESSAGE),
    })
}

/// `s` cut to at most `max` bytes at a character boundary.
pub(crate) fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(percent: u32, stage: &str, message: &str) -> Piece {
        Piece::Progress(pb::Progress {
            percent,
            stage: stage.into(),
            message: message.into(),
        })
    }

    fn log(offset: u64, data: &str) -> Piece {
        Piece::Log {
            offset,
            data: data.as_bytes().to_vec(),
        }
    }

    #[test]
    fn parses_the_documented_forms() {
        assert_eq!(
            parse_progress(b"::progress 40 loading data::\n"),
            Some(pb::Progress {
                percent: 40,
                stage: "loading data".into(),
                message: String::new()
            })
        );
        assert_eq!(
            parse_progress(b"::progress 75% upload::3 of 4 files\r\n"),
            Some(pb::Progress {
                percent: 75,
                stage: "upload".into(),
                message: "3 of 4 files".into()
            })
        );
        assert_eq!(
            parse_progress(b"::progress 100::"),
            Some(pb::Progress {
                percent: 100,
                ..Default::default()
            })
        );
        for bad in [
            &b"::progress 101 x::"[..],
            b"::progress lots::",
            b"::progress 40 no end",
            b" ::progress 40 x::",
            b"::progress -1::",
            b"::progress +40::",
        ] {
            assert_eq!(
                parse_progress(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn progress_lines_leave_the_log_and_offsets_count_stored_bytes() {
        let mut s = OutputStream::default();
        let pieces = s.feed(b"a\n::progress 10 one::\nbc\n::progress 20::x\n");
        assert_eq!(
            pieces,
            vec![
                log(0, "a\n"),
                progress(10, "one", ""),
                log(2, "bc\n"),
                progress(20, "", "x")
            ]
        );
        assert!(s.finish().is_empty());
    }

    #[test]
    fn a_progress_line_split_across_chunks_is_recognised() {
        let mut s = OutputStream::default();
        assert_eq!(s.feed(b"x\n::pro"), vec![log(0, "x\n")]);
        assert_eq!(s.feed(b"gress 5"), vec![]);
        assert_eq!(
            s.feed(b"0 half::\nrest"),
            vec![progress(50, "half", ""), log(2, "rest")]
        );
        assert_eq!(s.feed(b" of line\n"), vec![log(6, " of line\n")]);
    }

    #[test]
    fn ordinary_partial_lines_are_not_held_back() {
        let mut s = OutputStream::default();
        assert_eq!(s.feed(b"no newline"), vec![log(0, "no newline")]);
        // The rest of that line is not a line start, even if it looks like progress.
        assert_eq!(
            s.feed(b"::progress 1::\n"),
            vec![log(10, "::progress 1::\n")]
        );
        // A held start that turns out not to be progress is released as log.
        assert_eq!(s.feed(b"::pr"), vec![]);
        assert_eq!(s.feed(b"int\n"), vec![log(25, "::print\n")]);
        assert_eq!(s.feed(b"::progress 9 unterminated"), vec![]);
        assert_eq!(s.finish(), vec![log(33, "::progress 9 unterminated")]);
    }

    #[test]
    fn invalid_progress_stays_in_the_log_byte_for_byte() {
        let mut s = OutputStream::default();
        assert_eq!(
            s.feed(b"::progress 400 x::\n"),
            vec![log(0, "::progress 400 x::\n")]
        );
    }

    #[test]
    fn long_stage_and_message_are_cut_at_a_char_boundary() {
        let stage = "é".repeat(100);
        let line = format!("::progress 1 {stage}::{}\n", "m".repeat(1500));
        let p = parse_progress(line.as_bytes()).expect("parses");
        assert!(p.stage.len() <= MAX_STAGE && p.stage.chars().all(|c| c == 'é'));
        assert_eq!(p.message.len(), MAX_MESSAGE);
        // A line longer than a held-back line may be is output, however it was read.
        let long = format!("::progress 1 x::{}\n", "m".repeat(MAX_PROGRESS_LINE));
        assert_eq!(parse_progress(long.as_bytes()), None);
        let mut s = OutputStream::default();
        let pieces = s.feed(long.as_bytes());
        assert!(matches!(&pieces[..], [Piece::Log { .. }]), "{pieces:?}");
    }
}
