//! The ceiling for an artifact pull on this machine: the same bytes over a bare TLS stream,
//! with none of gRPC, HTTP/2 or the fleet around them.
//!
//! Both ends run over loopback TCP with the libraries a real pull uses: rustls with ring
//! (TLS 1.3, AES-256-GCM), a 256 KiB read buffer under the client's TLS as the agent has,
//! 1 MiB chunks read with `pread` on the server, and on the client a hashing thread
//! ([`StreamingDigest`]) and a writing thread ([`DirectWriter`], `O_DIRECT` in 8 MiB blocks)
//! fed the same chunks. Like the control plane and the agent, the benchmark restarts itself
//! with glibc's raised `rep movsb` threshold on the AMD hosts that need it.
//!
//! Each round times `openssl dgst -sha256` of the page-cached file, then the transfer twice,
//! each from connect to the last byte hashed and written: once with both ends in this process
//! (one runtime of two workers serves both), and once from a second process of this binary
//! that plays the server with its own runtime, as the control plane and an agent are two
//! processes in a real pull. For each it prints the ratio `steward-pull-bench` reports for a
//! single agent (openssl ÷ pull, 1.00 = as fast as hashing alone) and the CPU both ends used.
//!
//! ```text
//! cargo build --release --workspace --bins
//! target/release/steward-tls-ceiling-bench target/models/gemma3-270m-q4_k_m.gguf [ROUNDS]
//! ```

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, ensure};
use bytes::{Bytes, BytesMut};
use steward_artifact::digest::StreamingDigest;
use steward_artifact::direct_write::{DirectWriter, aligned_block};
use steward_tests::bench::{cpu_seconds, openssl_sha256, warm};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;

const CHUNK: usize = 1 << 20;
const READ_BUFFER: usize = 256 << 10;
const BLOCK: usize = 8 << 20;
const QUEUE: usize = 8;

fn main() -> anyhow::Result<()> {
    // The same copies as the control plane and the agent make: on AMD hosts with an older
    // glibc they restart with a raised `rep movsb` threshold, and so does the ceiling.
    steward_proto::glibc_memcpy::reexec_if_memcpy_is_slow();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match args.first().map(String::as_str) {
        Some(SERVE) => runtime.block_on(serve_alone(&args[1..])),
        _ => runtime.block_on(run(args)),
    }
}

/// The first argument that makes this binary the server of the two-process arrangement.
const SERVE: &str = "--serve";

async fn run(args: Vec<String>) -> anyhow::Result<()> {
    let file = PathBuf::from(
        args.first()
            .context("usage: steward-tls-ceiling-bench MODEL.gguf [ROUNDS, default 5]")?,
    );
    let rounds: usize = args
        .get(1)
        .map_or(Ok(5), |r| r.parse())
        .context("rounds must be a number")?;
    ensure!(file.is_file(), "{} not found", file.display());
    let size = std::fs::metadata(&file)?.len();
    warm(&file)?;
    let work = tempfile::tempdir_in(file.parent().unwrap_or(Path::new(".")))?;
    let identity = Identity::generate()?;
    let connector = identity.connector()?;
    let here = serve(identity.acceptor()?, &file).await?;
    let apart = ServerProcess::start(&identity, &file, work.path())?;
    println!(
        "| round | size | openssl dgst s | one process: pull s | openssl ÷ pull | CPU s | \
         two processes: pull s | openssl ÷ pull | CPU s |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for round in 1..=rounds {
        let openssl = openssl_sha256(&file)?.as_secs_f64();
        let out = work.path().join(format!("round-{round}"));
        let (one, one_cpu) = timed_transfer(&connector, here, &out, size, None).await?;
        let (two, two_cpu) =
            timed_transfer(&connector, apart.addr, &out, size, Some(apart.pid())).await?;
        println!(
            "| {round} | {} MB | {openssl:.3} | {one:.3} | {:.2} | {one_cpu:.2} | {two:.3} | \
             {:.2} | {two_cpu:.2} |",
            size / 1_000_000,
            openssl / one,
            openssl / two,
        );
    }
    Ok(())
}

/// One transfer into `out` (removed afterwards): its wall time and the CPU this process and
/// the `server` process, where the server runs apart, used meanwhile.
async fn timed_transfer(
    connector: &tokio_rustls::TlsConnector,
    addr: std::net::SocketAddr,
    out: &Path,
    size: u64,
    server: Option<u32>,
) -> anyhow::Result<(f64, f64)> {
    let cpu = || -> anyhow::Result<f64> {
        let apart = match server {
            Some(pid) => cpu_seconds(pid)?,
            None => 0.0,
        };
        Ok(cpu_seconds(std::process::id())? + apart)
    };
    let cpu_before = cpu()?;
    let started = Instant::now();
    let received = receive(connector, addr, out).await?;
    let wall = started.elapsed().as_secs_f64();
    let used = cpu()? - cpu_before;
    ensure!(received == size, "received {received} of {size} bytes");
    std::fs::remove_file(out)?;
    Ok((wall, used))
}

/// Serves `file` to every connection on a loopback port of this process; returns the port's
/// address.
async fn serve(
    acceptor: tokio_rustls::TlsAcceptor,
    file: &Path,
) -> anyhow::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let size = std::fs::metadata(file)?.len();
    let source = Arc::new(std::fs::File::open(file)?);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, source) = (acceptor.clone(), source.clone());
            tokio::spawn(async move {
                if let Err(e) = send(acceptor, tcp, &source, size).await {
                    eprintln!("sending failed: {e:#}");
                }
            });
        }
    });
    Ok(addr)
}

/// The server process: `--serve FILE CERT.der KEY.der`. Prints its address on stdout and
/// serves until its stdin closes (the benchmark exiting).
async fn serve_alone(args: &[String]) -> anyhow::Result<()> {
    let [file, cert, key] = args else {
        anyhow::bail!("usage: {SERVE} FILE CERT.der KEY.der");
    };
    let identity = Identity {
        cert: std::fs::read(cert).with_context(|| format!("reading {cert}"))?,
        key: std::fs::read(key).with_context(|| format!("reading {key}"))?,
    };
    let addr = serve(identity.acceptor()?, Path::new(file)).await?;
    println!("{addr}");
    tokio::task::spawn_blocking(|| std::io::copy(&mut std::io::stdin(), &mut std::io::sink()))
        .await??;
    Ok(())
}

/// The second process of the two-process arrangement, stopped when dropped.
struct ServerProcess {
    child: std::process::Child,
    addr: std::net::SocketAddr,
}

impl ServerProcess {
    fn start(identity: &Identity, file: &Path, work: &Path) -> anyhow::Result<Self> {
        let (cert, key) = (work.join("cert.der"), work.join("key.der"));
        std::fs::write(&cert, &identity.cert)?;
        std::fs::write(&key, &identity.key)?;
        let mut child = std::process::Command::new(std::env::current_exe()?)
            .arg(SERVE)
            .args([file, &cert, &key])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("starting the server process")?;
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().context("server's stdout")?),
            &mut line,
        )?;
        let addr = line
            .trim()
            .parse()
            .with_context(|| format!("the server process printed {line:?}, not its address"))?;
        Ok(Self { child, addr })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh self-signed certificate for `localhost` and its key (both DER), from which the
/// server and the client that trusts it are configured, with ring as the crypto provider as in
/// Steward.
struct Identity {
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl Identity {
    fn generate() -> anyhow::Result<Self> {
        let key = rcgen::KeyPair::generate()?;
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])?.self_signed(&key)?;
        Ok(Self {
            cert: cert.der().to_vec(),
            key: key.serialize_der(),
        })
    }

    fn acceptor(&self) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![self.cert.clone().into()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(self.key.clone().into()),
            )?;
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(server)))
    }

    fn connector(&self) -> anyhow::Result<tokio_rustls::TlsConnector> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.clone().into())?;
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(tokio_rustls::TlsConnector::from(Arc::new(client)))
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Sends the whole file in 1 MiB chunks, reusing one buffer.
async fn send(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    source: &std::fs::File,
    size: u64,
) -> anyhow::Result<()> {
    tcp.set_nodelay(true)?;
    let mut tls = acceptor.accept(tcp).await?;
    let mut buf = vec![0; CHUNK];
    let mut offset = 0;
    while offset < size {
        let len = (size - offset).min(CHUNK as u64) as usize;
        source.read_exact_at(&mut buf[..len], offset)?;
        tls.write_all(&buf[..len]).await?;
        offset += len as u64;
    }
    tls.shutdown().await?;
    Ok(())
}

/// Receives one transfer into `out`, hashing and writing on two threads; returns the bytes
/// received once both threads are done.
async fn receive(
    connector: &tokio_rustls::TlsConnector,
    addr: std::net::SocketAddr,
    out: &Path,
) -> anyhow::Result<u64> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let tcp = tokio::io::BufReader::with_capacity(READ_BUFFER, tcp);
    let mut tls = connector.connect("localhost".try_into()?, tcp).await?;
    let (hash_tx, mut hash_rx) = tokio::sync::mpsc::channel::<Bytes>(QUEUE);
    let (write_tx, mut write_rx) = tokio::sync::mpsc::channel::<Bytes>(QUEUE);
    let hashing = tokio::task::spawn_blocking(move || {
        let mut digest = StreamingDigest::new();
        while let Some(chunk) = hash_rx.blocking_recv() {
            digest.update(&chunk);
        }
        digest
    });
    let mut writer = DirectWriter::create_new(out)?;
    let writing = tokio::task::spawn_blocking(move || {
        let mut block = aligned_block(BLOCK);
        while let Some(mut chunk) = write_rx.blocking_recv() {
            while !chunk.is_empty() {
                let take = (BLOCK - block.len()).min(chunk.len());
                block.extend_from_slice(&chunk.split_to(take));
                if block.len() == BLOCK {
                    writer.write_block(&block)?;
                    block.clear();
                }
            }
        }
        writer.finish(&mut block)
    });
    let mut received = 0;
    loop {
        let mut chunk = BytesMut::zeroed(CHUNK);
        let mut filled = 0;
        while filled < CHUNK {
            match tls.read(&mut chunk[filled..]).await? {
                0 => break,
                n => filled += n,
            }
        }
        if filled == 0 {
            break;
        }
        chunk.truncate(filled);
        let chunk = chunk.freeze();
        received += chunk.len() as u64;
        write_tx.send(chunk.clone()).await?;
        hash_tx.send(chunk).await?;
    }
    drop((hash_tx, write_tx));
    hashing.await?;
    writing.await??;
    Ok(received)
}
