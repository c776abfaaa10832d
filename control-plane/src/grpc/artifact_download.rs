//! `AgentService/FetchArtifact` served without copying the artifact's bytes into an encode
//! buffer.
//!
//! tonic's generated handler encodes each `ArtifactChunk` into a fresh buffer, one more pass
//! over every byte a pull sends. [`AgentServiceWithDownloads`] answers that one method
//! itself: each chunk goes out as a few bytes of gRPC message prefix and protobuf field
//! headers, then the chunk's own buffer, as two HTTP/2 DATA frames. On the wire it is the
//! same gRPC stream of `ArtifactChunk` messages; every other method of the service goes to
//! tonic's handler unchanged.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use http_body::Frame;
use steward_proto::agent::v1::FetchArtifactRequest;
use steward_proto::agent::v1::agent_service_server::AgentServiceServer;
use tonic::Status;
use tonic::body::Body;
use tonic::codec::{Codec, Streaming};
use tonic::codegen::{BoxFuture, Service};
use tonic::server::NamedService;

use super::agent::AgentApi;

/// The method this module serves itself.
const FETCH_ARTIFACT_PATH: &str = "/steward.agent.v1.AgentService/FetchArtifact";
/// A download request is a digest and an offset; anything much larger is not one.
const REQUEST_LIMIT: usize = 4 << 10;

/// The agent service, with `FetchArtifact` answered by [`download_response`].
#[derive(Clone, Debug)]
pub struct AgentServiceWithDownloads {
    api: Arc<AgentApi>,
    generated: AgentServiceServer<AgentApi>,
}

impl AgentServiceWithDownloads {
    pub fn new(api: AgentApi) -> Self {
        let api = Arc::new(api);
        Self {
            generated: AgentServiceServer::from_arc(api.clone()),
            api,
        }
    }
}

impl NamedService for AgentServiceWithDownloads {
    const NAME: &'static str = <AgentServiceServer<AgentApi> as NamedService>::NAME;
}

impl Service<http::Request<Body>> for AgentServiceWithDownloads {
    type Response = http::Response<Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Service::<http::Request<Body>>::poll_ready(&mut self.generated, cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if request.uri().path() != FETCH_ARTIFACT_PATH {
            return self.generated.call(request);
        }
        let api = self.api.clone();
        Box::pin(async move {
            Ok(match download_response(&api, request).await {
                Ok(response) => response,
                Err(status) => status.into_http(),
            })
        })
    }
}

/// Decodes the request, opens the download (authentication and every check happen in
/// [`AgentApi::open_download`]) and answers with a body that streams the chunks.
async fn download_response(
    api: &AgentApi,
    request: http::Request<Body>,
) -> Result<http::Response<Body>, Status> {
    refuse_compressed(request.headers())?;
    let (parts, body) = request.into_parts();
    let mut codec = tonic_prost::ProstCodec::<(), FetchArtifactRequest>::default();
    let mut messages = Streaming::new_request(codec.decoder(), body, None, Some(REQUEST_LIMIT));
    let message = messages
        .message()
        .await?
        .ok_or_else(|| Status::invalid_argument("FetchArtifact needs a request message"))?;
    let mut request = tonic::Request::new(message);
    *request.extensions_mut() = parts.extensions;
    let chunks = api.open_download(request).await?;
    let mut response = http::Response::new(Body::new(ChunkBody::new(chunks)));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    Ok(response)
}

/// A request compressed with any encoding is refused, as tonic's handler (with no
/// compression enabled) refuses it; `identity` is no compression.
fn refuse_compressed(headers: &http::HeaderMap) -> Result<(), Status> {
    match headers.get("grpc-encoding") {
        None => Ok(()),
        Some(encoding) if encoding == "identity" => Ok(()),
        Some(encoding) => Err(Status::unimplemented(format!(
            "FetchArtifact takes an uncompressed request, not one encoded with {encoding:?}"
        ))),
    }
}

/// The chunks of one download: `(offset, bytes)` in order, or the error that stopped it.
pub type Chunks = Pin<Box<dyn Stream<Item = Result<(u64, Bytes), Status>> + Send>>;

/// A gRPC response body of `ArtifactChunk` messages, each sent as its header and then its
/// data buffer, and ended by trailers with the call's status.
struct ChunkBody {
    chunks: Option<Chunks>,
    /// The data of the message whose header was just sent.
    data: Option<Bytes>,
}

impl ChunkBody {
    fn new(chunks: Chunks) -> Self {
        Self {
            chunks: Some(chunks),
            data: None,
        }
    }
}

impl http_body::Body for ChunkBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        let Some(chunks) = self.chunks.as_mut() else {
            return Poll::Ready(None);
        };
        let status = match std::task::ready!(chunks.poll_next_unpin(cx)) {
            Some(Ok((offset, data))) => {
                let header = message_header(offset, data.len());
                self.data = Some(data);
                return Poll::Ready(Some(Ok(Frame::data(header))));
            }
            Some(Err(status)) => status,
            None => Status::ok(""),
        };
        self.chunks = None;
        let mut trailers = http::HeaderMap::new();
        if let Err(unencodable) = status.add_header(&mut trailers) {
            trailers.clear();
            let _ = unencodable.add_header(&mut trailers);
        }
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_none() && self.data.is_none()
    }
}

/// The gRPC message prefix and the protobuf encoding of `ArtifactChunk { offset, data }` up
/// to the first byte of `data`, for a chunk of `len` bytes. Field 1 is left out when the
/// offset is 0, as protobuf encoders do for a default value.
fn message_header(offset: u64, len: usize) -> Bytes {
    const OFFSET_KEY: u8 = 1 << 3; // field 1, varint
    const DATA_KEY: u8 = (2 << 3) | 2; // field 2, length-delimited
    let mut fields = BytesMut::with_capacity(24);
    if offset != 0 {
        fields.put_u8(OFFSET_KEY);
        put_varint(&mut fields, offset);
    }
    fields.put_u8(DATA_KEY);
    put_varint(&mut fields, len as u64);
    let message_len = fields.len() + len;
    let mut header = BytesMut::with_capacity(5 + fields.len());
    header.put_u8(0); // not compressed
    header.put_u32(u32::try_from(message_len).expect("a chunk is far below 4 GiB"));
    header.put_slice(&fields);
    header.freeze()
}

fn put_varint(out: &mut BytesMut, mut value: u64) {
    while value >= 0x80 {
        out.put_u8((value as u8) | 0x80);
        value >>= 7;
    }
    out.put_u8(value as u8);
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use steward_proto::agent::v1::ArtifactChunk;

    /// The gRPC framing prost and tonic would produce for `chunk`.
    fn encoded_by_prost(chunk: &ArtifactChunk) -> Vec<u8> {
        let body = chunk.encode_to_vec();
        let mut framed = vec![0];
        framed.extend_from_slice(&(body.len() as u32).to_be_bytes());
        framed.extend_from_slice(&body);
        framed
    }

    #[test]
    fn hand_framed_chunks_are_byte_for_byte_what_prost_encodes() {
        let data = Bytes::from((0..300u32).map(|i| i as u8).collect::<Vec<_>>());
        for (offset, len) in [
            (0, 1),
            (0, 127),
            (0, 128),
            (1, 300),
            (127, 16_384),
            (128, 0x10_0000),
            (253_113_024 - 5, 5),
            (u64::MAX, 2),
        ] {
            let data: Bytes = data.iter().copied().cycle().take(len).collect();
            let mut ours = message_header(offset, len).to_vec();
            ours.extend_from_slice(&data);
            let want = encoded_by_prost(&ArtifactChunk { offset, data });
            assert_eq!(ours, want, "offset {offset}, {len} bytes");
        }
    }

    #[test]
    fn the_intercepted_path_is_the_generated_services_fetch_artifact() {
        let name = <AgentServiceServer<AgentApi> as NamedService>::NAME;
        assert_eq!(FETCH_ARTIFACT_PATH, format!("/{name}/FetchArtifact"));
    }

    #[test]
    fn only_an_uncompressed_request_is_taken() {
        let mut headers = http::HeaderMap::new();
        assert!(refuse_compressed(&headers).is_ok());
        headers.insert("grpc-encoding", http::HeaderValue::from_static("identity"));
        assert!(refuse_compressed(&headers).is_ok());
        headers.insert("grpc-encoding", http::HeaderValue::from_static("gzip"));
        let refused = refuse_compressed(&headers).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unimplemented);
        assert!(refused.message().contains("gzip"), "{refused:?}");
    }

    #[tokio::test]
    async fn the_body_sends_each_chunk_then_ok_trailers() {
        use http_body_util::BodyExt;
        let chunks: Chunks = Box::pin(futures::stream::iter([
            Ok((0, Bytes::from_static(b"abc"))),
            Ok((3, Bytes::from_static(b"defg"))),
        ]));
        let collected = ChunkBody::new(chunks).collect().await.unwrap();
        let trailers = collected.trailers().cloned().unwrap();
        assert_eq!(trailers.get("grpc-status").unwrap(), "0");
        let bytes = collected.to_bytes();
        let mut want = encoded_by_prost(&ArtifactChunk {
            offset: 0,
            data: Bytes::from_static(b"abc"),
        });
        want.extend(encoded_by_prost(&ArtifactChunk {
            offset: 3,
            data: Bytes::from_static(b"defg"),
        }));
        assert_eq!(bytes.as_ref(), want.as_slice());
    }

    #[tokio::test]
    async fn an_error_mid_stream_ends_the_body_with_its_status() {
        use http_body_util::BodyExt;
        let chunks: Chunks = Box::pin(futures::stream::iter([
            Ok((0, Bytes::from_static(b"abc"))),
            Err(Status::internal(
                "reading the artifact failed: disk on fire",
            )),
            Ok((3, Bytes::from_static(b"never sent"))),
        ]));
        let collected = ChunkBody::new(chunks).collect().await.unwrap();
        let trailers = collected.trailers().cloned().unwrap();
        let status = Status::from_header_map(&trailers).unwrap();
        assert_eq!(status.code(), tonic::Code::Internal);
        assert!(status.message().contains("disk on fire"));
        assert_eq!(
            collected.to_bytes().as_ref(),
            encoded_by_prost(&ArtifactChunk {
                offset: 0,
                data: Bytes::from_static(b"abc")
            })
            .as_slice()
        );
    }
}
