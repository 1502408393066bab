//! Criterion benchmarks for the sans-IO NBD codec in `tandem-proto`.
//!
//! What every NBD request pays in `repd` before and after the disk:
//! - `request/*`: decode a 28-byte request header and validate it against
//!   the negotiated export (`RequestHeader::decode` + `validate`);
//! - `reply/*`: encode a 16-byte simple reply;
//! - `handshake/go`: a whole fixed-newstyle negotiation (greeting, client
//!   flags, `NBD_OPT_GO` with an `INFO_BLOCK_SIZE` request, the server's
//!   replies) through `ServerHandshake`, with a trivial export catalog;
//! - `payload_mmap/*` and `payload_heap/*`: allocating a zeroed
//!   `AlignedBuf` for a write payload, freezing it into `Bytes` and dropping
//!   it, at 4 KiB and 1 MiB, next to an unzeroed allocation of the same
//!   size for scale. glibc's default choice between the heap and a fresh
//!   `mmap` for a 1 MiB aligned block depends on its dynamic thresholds and
//!   on the heap's layout, which made this bench swing between ~20 us and
//!   ~600 us per 1 MiB buffer from one build to the next. So each group pins
//!   the choice with `mallopt`: `payload_mmap` fixes the mmap threshold at
//!   glibc's initial 128 KiB (every 1 MiB buffer is a fresh mapping, what
//!   strace showed in `repd` before it tuned its allocator: one `mmap` and
//!   one `munmap` per 1 MiB request); `payload_heap` uses the 32 MiB
//!   threshold `repd` now sets (`daemon::memory::tune_allocator`).
//!
//! Run: `cargo bench -p tandem-benches --bench codec`.

use std::alloc::{Layout, alloc, dealloc};
use std::hint::black_box;

use bytes::BytesMut;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tandem_proto::AlignedBuf;
use tandem_proto::buf::PAYLOAD_ALIGN;
use tandem_proto::nbd::ErrorCode;
use tandem_proto::nbd::consts::*;
use tandem_proto::nbd::handshake::{
    BlockSizes, ExportCatalog, ExportDetails, Refusal, RefusalKind, ServerHandshake, Status, client,
};
use tandem_proto::nbd::transmission::{
    Decision, Limits, REQUEST_HEADER_LEN, RequestHeader, SimpleReply, validate,
};

/// The flags `repd` sends for a writable export.
const REPD_FLAGS: u16 = TFLAG_HAS_FLAGS
    | TFLAG_SEND_FLUSH
    | TFLAG_SEND_FUA
    | TFLAG_SEND_CACHE
    | TFLAG_SEND_TRIM
    | TFLAG_SEND_WRITE_ZEROES
    | TFLAG_SEND_FAST_ZERO
    | TFLAG_CAN_MULTI_CONN;

fn limits() -> Limits {
    Limits {
        export_size: 2 << 30,
        max_payload: 32 << 20,
        flags: REPD_FLAGS,
    }
}

fn header(command: u16, flags: u16, offset: u64, length: u32) -> [u8; REQUEST_HEADER_LEN] {
    RequestHeader {
        flags,
        command,
        cookie: 0x1234_5678_9abc_def0,
        offset,
        length,
    }
    .encode()
}

fn request(c: &mut Criterion) {
    let limits = limits();
    let mut g = c.benchmark_group("request");
    let cases = [
        ("write_4k", header(CMD_WRITE, 0, 1 << 20, 4096)),
        (
            "write_fua_4k",
            header(CMD_WRITE, CMD_FLAG_FUA, 1 << 20, 4096),
        ),
        ("read_1m", header(CMD_READ, 0, 1 << 20, 1 << 20)),
        ("flush", header(CMD_FLUSH, 0, 0, 0)),
    ];
    for (name, raw) in cases {
        // Sanity: every case is executed, not rejected.
        let h = RequestHeader::decode(&raw).expect("valid magic");
        assert!(matches!(validate(&h, &limits), Decision::Execute(_)));
        g.bench_function(BenchmarkId::new("decode_validate", name), |b| {
            b.iter(|| {
                let h = RequestHeader::decode(black_box(&raw)).expect("valid magic");
                validate(&h, black_box(&limits))
            })
        });
    }
    g.finish();
}

fn reply(c: &mut Criterion) {
    let mut g = c.benchmark_group("reply");
    g.bench_function("encode_ok", |b| {
        b.iter(|| SimpleReply::ok(black_box(0x1234_5678_9abc_def0)).encode())
    });
    g.bench_function("encode_error", |b| {
        b.iter(|| SimpleReply::err(black_box(42), black_box(ErrorCode::NoSpace)).encode())
    });
    g.finish();
}

/// A one-export catalog, as cheap as a catalog can be.
struct OneExport(ExportDetails);

impl ExportCatalog for OneExport {
    fn list(&mut self) -> Vec<String> {
        vec![self.0.name.clone()]
    }

    fn describe(&mut self, name: &str) -> Result<ExportDetails, Refusal> {
        if name.is_empty() || name == self.0.name {
            Ok(self.0.clone())
        } else {
            Err(Refusal {
                kind: RefusalKind::UnknownExport,
                message: format!("no export {name:?}"),
            })
        }
    }

    fn select(&mut self, name: &str) -> Result<ExportDetails, Refusal> {
        self.describe(name)
    }
}

fn handshake(c: &mut Criterion) {
    let mut catalog = OneExport(ExportDetails {
        name: "r0".into(),
        description: "Tandem resource r0 on node alpha".into(),
        size: 2 << 30,
        flags: REPD_FLAGS,
        block_sizes: BlockSizes::TANDEM,
    });
    // What libnbd sends: client flags, then NBD_OPT_GO asking for block sizes.
    let mut client_bytes = (CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    client_bytes.extend(client::encode_option(
        OPT_GO,
        &client::encode_info_request("r0", &[INFO_BLOCK_SIZE]),
    ));

    // Sanity: the bytes negotiate successfully.
    {
        let mut hs = ServerHandshake::new();
        let mut input = BytesMut::from(&client_bytes[..]);
        let status = hs.handle_input(&mut input, &mut catalog);
        assert!(matches!(status, Status::Transmission(_)), "{status:?}");
        assert!(input.is_empty());
    }

    c.bench_function("handshake/go", |b| {
        b.iter(|| {
            let mut hs = ServerHandshake::new();
            let greeting = hs.take_output();
            let mut input = BytesMut::from(black_box(&client_bytes[..]));
            let status = hs.handle_input(&mut input, &mut catalog);
            let replies = hs.take_output();
            (greeting, status, replies)
        })
    });
}

/// Fix glibc's mmap and trim thresholds (disables its dynamic adjustment).
#[cfg(target_env = "gnu")]
fn set_malloc_thresholds(mmap: libc::c_int) {
    // SAFETY: mallopt takes integer arguments only.
    let ok = unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, mmap) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, 2 * mmap) == 1
    };
    assert!(ok, "glibc refused mmap threshold {mmap}");
}

fn payload_mmap(c: &mut Criterion) {
    #[cfg(target_env = "gnu")]
    {
        set_malloc_thresholds(128 << 10);
        payload_group(c, "payload_mmap");
    }
    #[cfg(not(target_env = "gnu"))]
    payload_group(c, "payload");
}

fn payload_heap(c: &mut Criterion) {
    #[cfg(target_env = "gnu")]
    {
        set_malloc_thresholds(32 << 20);
        payload_group(c, "payload_heap");
    }
    #[cfg(not(target_env = "gnu"))]
    let _ = c; // not glibc: the default group above is all there is
}

fn payload_group(c: &mut Criterion, name: &str) {
    let mut g = c.benchmark_group(name);
    for (name, len) in [("4KiB", 4096usize), ("1MiB", 1 << 20)] {
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_function(BenchmarkId::new("aligned_zeroed_into_bytes", name), |b| {
            b.iter(|| AlignedBuf::zeroed(black_box(len)).into_bytes())
        });
        // For scale: the same allocation without zeroing (what a payload
        // buffer that is about to be overwritten by read_exact needs).
        let layout = Layout::from_size_align(len, PAYLOAD_ALIGN).expect("layout");
        g.bench_function(BenchmarkId::new("aligned_uninit_alloc_free", name), |b| {
            b.iter(|| {
                // SAFETY: layout has a non-zero size; the pointer is freed
                // with the same layout and never read.
                unsafe {
                    let p = alloc(black_box(layout));
                    assert!(!p.is_null());
                    dealloc(black_box(p), layout);
                }
            })
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    request,
    reply,
    handshake,
    payload_mmap,
    payload_heap
);
criterion_main!(benches);
