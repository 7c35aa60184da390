//! MLLP load generator for the HL7 durable-acceptance benchmark (`hw-tests/bench/hl7_bench.py`).
//! Run by hand, never by the test suite.
//!
//! ```sh
//! cargo build --release -p gateway-mllp --example mllp_load
//! target/release/examples/mllp_load --port 2575 --senders 8 --messages 40000 [--warmup 400]
//! ```
//!
//! Opens `--senders` TCP connections to `127.0.0.1:PORT` (TCP_NODELAY) and on each sends its
//! share of `--messages` ADT^A08 one at a time: write the frame, read the whole acknowledgement,
//! then the next. Every message has its own MSH-10; the acknowledgement must carry MSA-2 = that
//! MSH-10 (anything else stops the run) and MSA-1 = AA (anything else is counted as `non_aa`).
//! The latency of a message runs from the last byte of its frame written to the last byte of
//! its acknowledgement read. `--warmup` messages (in total, split over the senders) go first
//! and are neither timed nor counted; then all senders start together.
//!
//! Prints one JSON line: `senders, messages, seconds, msgs_per_sec, p50_ms, p99_ms, max_ms,
//! non_aa`. Exit status 1 if any acknowledgement was not AA, 2 on a usage or I/O error.
//! Patient data is synthetic (ZZTEST).

use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gateway_hl7::mllp::encode_frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Barrier;

const START_BLOCK: u8 = 0x0b;
const END_BLOCK: u8 = 0x1c;
const CARRIAGE_RETURN: u8 = 0x0d;
/// A server that does not answer within this time fails the run instead of hanging it.
const ACK_TIMEOUT: Duration = Duration::from_secs(60);

const USAGE: &str = "usage: mllp_load --port P --senders N --messages M [--warmup W]";

#[derive(Debug, Clone, Copy)]
struct Args {
    port: u16,
    senders: usize,
    messages: usize,
    warmup: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut port = None;
    let mut senders = None;
    let mut messages = None;
    let mut warmup = 0usize;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            return Err(USAGE.to_owned());
        }
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let bad = |e: std::num::ParseIntError| format!("{flag} {value}: {e}\n{USAGE}");
        match flag.as_str() {
            "--port" => port = Some(value.parse::<u16>().map_err(bad)?),
            "--senders" => senders = Some(value.parse::<usize>().map_err(bad)?),
            "--messages" => messages = Some(value.parse::<usize>().map_err(bad)?),
            "--warmup" => warmup = value.parse::<usize>().map_err(bad)?,
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    let args = Args {
        port: port.ok_or_else(|| format!("--port is required\n{USAGE}"))?,
        senders: senders.ok_or_else(|| format!("--senders is required\n{USAGE}"))?,
        messages: messages.ok_or_else(|| format!("--messages is required\n{USAGE}"))?,
        warmup,
    };
    if args.senders == 0 || args.messages < args.senders {
        return Err(format!(
            "need 1 <= senders <= messages (got {} senders, {} messages)",
            args.senders, args.messages
        ));
    }
    Ok(args)
}

/// `total` split over `senders`: the first `total % senders` get one more.
fn share(total: usize, senders: usize, sender: usize) -> usize {
    total / senders + usize::from(sender < total % senders)
}

/// An ADT^A08 with synthetic patient data, segments ended by CR.
fn adt_a08(control_id: &str, patient: usize) -> Vec<u8> {
    format!(
        "MSH|^~\\&|ZZHIS|ZZHOSP|GATEWAY|ZZCLINIC|20261201120000||ADT^A08^ADT_A01|{control_id}|P|2.5\r\
         EVN|A08|20261201120000\r\
         PID|1||ZZPID{patient:07}^^^ZZHOSP^PI||ZZTEST^TARO||19700101|F|||1-1 ZZTEST^^ZZCITY\r\
         PV1|1|O\r"
    )
    .into_bytes()
}

/// (MSA-1, MSA-2) of an acknowledgement payload.
fn msa(ack: &[u8]) -> Option<(&[u8], &[u8])> {
    let seg = ack
        .split(|&b| b == CARRIAGE_RETURN || b == b'\n')
        .find(|s| s.starts_with(b"MSA|"))?;
    let mut fields = seg.split(|&b| b == b'|').skip(1);
    let code = fields.next()?;
    let control_id = fields.next().unwrap_or_default();
    Some((code, control_id))
}

/// One MLLP connection that sends a frame and reads the whole acknowledgement.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Result<Self, String> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        stream
            .set_nodelay(true)
            .map_err(|e| format!("TCP_NODELAY on {addr}: {e}"))?;
        Ok(Self {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    /// Sends `frame`, returns the acknowledgement's payload and the time from the frame's
    /// last byte written to the acknowledgement's last byte read.
    async fn request(&mut self, frame: &[u8]) -> Result<(Vec<u8>, Duration), String> {
        self.stream
            .write_all(frame)
            .await
            .map_err(|e| format!("write: {e}"))?;
        let sent = Instant::now();
        let ack = tokio::time::timeout(ACK_TIMEOUT, self.read_frame())
            .await
            .map_err(|_| format!("no acknowledgement within {ACK_TIMEOUT:?}"))??;
        Ok((ack, sent.elapsed()))
    }

    async fn read_frame(&mut self) -> Result<Vec<u8>, String> {
        let mut scanned = 0;
        loop {
            // A whole frame: SB payload EB CR (anything before SB is skipped).
            if let Some(end) = self
                .buf
                .get(scanned..)
                .and_then(|rest| {
                    rest.windows(2)
                        .position(|w| w == [END_BLOCK, CARRIAGE_RETURN])
                })
                .map(|p| p + scanned)
            {
                let start = self
                    .buf
                    .get(..end)
                    .and_then(|head| head.iter().position(|&b| b == START_BLOCK))
                    .ok_or_else(|| "an acknowledgement without a start block".to_owned())?;
                let payload = self.buf.get(start + 1..end).unwrap_or_default().to_vec();
                self.buf.drain(..end + 2);
                return Ok(payload);
            }
            scanned = self.buf.len().saturating_sub(1);
            let mut chunk = [0u8; 4096];
            let n = self
                .stream
                .read(&mut chunk)
                .await
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("the server closed the connection".to_owned());
            }
            self.buf
                .extend_from_slice(chunk.get(..n).unwrap_or_default());
        }
    }
}

#[derive(Debug, Default)]
struct SenderResult {
    latencies_ns: Vec<u64>,
    non_aa: usize,
}

/// Sends message `seq` of sender `index` and checks its acknowledgement; returns whether it
/// was AA and its latency.
async fn exchange(
    conn: &mut Conn,
    tag: &str,
    index: usize,
    seq: usize,
) -> Result<(bool, Duration), String> {
    // MSH-10 (ST, at most 20 characters): run tag, sender, sequence.
    let control_id = format!("{tag}{index:02}{seq:08}");
    let frame = encode_frame(&adt_a08(&control_id, index * 10_000_000 + seq));
    let (ack, latency) = conn
        .request(&frame)
        .await
        .map_err(|e| format!("sender {index}, message {control_id}: {e}"))?;
    let (code, echoed) = msa(&ack).ok_or_else(|| {
        format!(
            "sender {index}: no MSA segment in the acknowledgement of {control_id}: {}",
            String::from_utf8_lossy(&ack)
        )
    })?;
    if echoed != control_id.as_bytes() {
        return Err(format!(
            "sender {index}: MSA-2 {} does not match MSH-10 {control_id}",
            String::from_utf8_lossy(echoed)
        ));
    }
    Ok((code == b"AA", latency))
}

async fn warm_up(addr: SocketAddr, tag: &str, index: usize, warmup: usize) -> Result<Conn, String> {
    let mut conn = Conn::open(addr).await?;
    for seq in 0..warmup {
        exchange(&mut conn, tag, index, seq).await?;
    }
    Ok(conn)
}

async fn sender(
    addr: SocketAddr,
    tag: String,
    index: usize,
    warmup: usize,
    count: usize,
    start: Arc<Barrier>,
) -> Result<SenderResult, String> {
    let warmed = warm_up(addr, &tag, index, warmup).await;
    // Wait even after a failure, so that the others and the clock are not held forever.
    start.wait().await;
    let mut conn = warmed?;
    let mut result = SenderResult {
        latencies_ns: Vec::with_capacity(count),
        non_aa: 0,
    };
    for seq in warmup..warmup + count {
        let (aa, latency) = exchange(&mut conn, &tag, index, seq).await?;
        result.non_aa += usize::from(!aa);
        result
            .latencies_ns
            .push(u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX));
    }
    Ok(result)
}

/// Nearest-rank percentile of sorted values, in milliseconds.
fn percentile_ms(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    let i = rank.clamp(1, sorted.len()) - 1;
    sorted.get(i).copied().unwrap_or_default() as f64 / 1e6
}

async fn run(args: Args) -> Result<usize, String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, args.port));
    // A run tag keeps control ids unique across runs against the same server.
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let tag = format!("Z{:05X}", (nanos ^ std::process::id()) & 0xF_FFFF);
    // Every sender waits here after its warm-up; the main task too, and starts the clock.
    let start = Arc::new(Barrier::new(args.senders + 1));
    let mut tasks = Vec::with_capacity(args.senders);
    for index in 0..args.senders {
        tasks.push(tokio::spawn(sender(
            addr,
            tag.clone(),
            index,
            share(args.warmup, args.senders, index),
            share(args.messages, args.senders, index),
            Arc::clone(&start),
        )));
    }
    start.wait().await;
    let t0 = Instant::now();
    let mut latencies = Vec::with_capacity(args.messages);
    let mut non_aa = 0;
    let mut first_error = None;
    for task in tasks {
        match task.await {
            Ok(Ok(r)) => {
                latencies.extend_from_slice(&r.latencies_ns);
                non_aa += r.non_aa;
            }
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(e) => {
                first_error.get_or_insert(format!("sender task failed: {e}"));
            }
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    if let Some(e) = first_error {
        return Err(e);
    }
    latencies.sort_unstable();
    println!(
        "{{\"senders\": {}, \"messages\": {}, \"warmup\": {}, \"seconds\": {:.3}, \
         \"msgs_per_sec\": {:.1}, \"p50_ms\": {:.3}, \"p99_ms\": {:.3}, \"max_ms\": {:.3}, \
         \"non_aa\": {}}}",
        args.senders,
        latencies.len(),
        args.warmup,
        seconds,
        latencies.len() as f64 / seconds,
        percentile_ms(&latencies, 50.0),
        percentile_ms(&latencies, 99.0),
        percentile_ms(&latencies, 100.0),
        non_aa
    );
    Ok(non_aa)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    // One thread: the generator takes at most one core from the server it measures.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tokio runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(1),
        Err(e) => {
            eprintln!("mllp_load: {e}");
            ExitCode::from(2)
        }
    }
}
