//! The server side of the stream-per-request model: accept connections and streams, decode
//! one request frame per stream, hand it to the node's handler, write the response frame.
//!
//! A malformed frame gets an error reply on its stream, never a dropped connection; a
//! handler that panics gets an `Internal` reply. Work is bounded by the per-connection stream
//! limit (see `tls::IN_FLIGHT_MAX`) and [`CONNECTIONS_MAX`].

use std::future::Future;
use std::sync::Arc;

use billcl_proto::{ErrorCode, Frame, Request, Response, FRAME_BYTES_MAX, FRAME_HEADER_BYTES};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Connections one server holds at once; further ones are refused.
pub const CONNECTIONS_MAX: usize = 4096;

/// Accepts connections on `endpoint` until `shutdown` resolves. For each bidirectional
/// stream: read one request frame (at most [`FRAME_BYTES_MAX`]), call `handler`, write the
/// response frame and finish. On shutdown the endpoint is closed and connection tasks stop.
pub async fn serve<H, F>(endpoint: quinn::Endpoint, handler: H, shutdown: impl Future<Output = ()>)
where
    H: Fn(Request) -> F + Send + Sync + Clone + 'static,
    F: Future<Output = Response> + Send + 'static,
{
    let connections_allowed = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(finished) = connections.join_next(), if !connections.is_empty() => {
                if let Err(error) = finished {
                    if error.is_panic() {
                        tracing::error!(%error, "a connection task panicked");
                    }
                }
            }
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let Ok(permit) = connections_allowed.clone().try_acquire_owned() else {
                    tracing::warn!(remote = %incoming.remote_address(), "refusing: too many connections");
                    incoming.refuse();
                    continue;
                };
                let handler = handler.clone();
                connections.spawn(async move {
                    let _permit = permit;
                    serve_connection(incoming, handler).await;
                });
            }
        }
    }
    endpoint.close(quinn::VarInt::from_u32(0), b"shutting down");
    connections.shutdown().await;
}

async fn serve_connection<H, F>(incoming: quinn::Incoming, handler: H)
where
    H: Fn(Request) -> F + Send + Sync + Clone + 'static,
    F: Future<Output = Response> + Send + 'static,
{
    let remote = incoming.remote_address();
    let connection = match incoming.await {
        Ok(connection) => connection,
        Err(error) => {
            tracing::debug!(%remote, %error, "handshake failed");
            return;
        }
    };
    let mut streams = JoinSet::new();
    loop {
        let (send, recv) = match connection.accept_bi().await {
            Ok(stream) => stream,
            Err(error) => {
                tracing::debug!(%remote, %error, "connection closed");
                break;
            }
        };
        // Reap finished stream tasks so the set does not grow with the connection's age.
        while streams.try_join_next().is_some() {}
        streams.spawn(serve_stream(send, recv, handler.clone()));
    }
    streams.shutdown().await;
}

/// The request id of a frame whose body failed to decode, so the error reply can be matched.
fn header_request_id(bytes: &[u8]) -> u64 {
    bytes
        .get(6..FRAME_HEADER_BYTES)
        .and_then(|id| id.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0)
}

async fn serve_stream<H, F>(mut send: quinn::SendStream, mut recv: quinn::RecvStream, handler: H)
where
    H: Fn(Request) -> F + Send + Sync + Clone + 'static,
    F: Future<Output = Response> + Send + 'static,
{
    let (request_id, response) = match recv.read_to_end(FRAME_BYTES_MAX).await {
        Err(quinn::ReadToEndError::TooLong) => (
            0,
            Response::error(
                ErrorCode::BadRequest,
                format!("request frame exceeds the limit of {FRAME_BYTES_MAX} bytes"),
            ),
        ),
        Err(error) => {
            tracing::debug!(%error, "request stream failed");
            return;
        }
        Ok(bytes) => {
            let request_id = header_request_id(&bytes);
            let decoded = Frame::decode_exact(&bytes).and_then(|frame| Request::from_frame(&frame));
            match decoded {
                Err(error) => (
                    request_id,
                    Response::error(ErrorCode::BadRequest, format!("malformed request: {error}")),
                ),
                Ok(request) => match tokio::spawn(handler(request)).await {
                    Ok(response) => (request_id, response),
                    Err(error) => {
                        tracing::error!(%error, "request handler failed");
                        (
                            request_id,
                            Response::error(ErrorCode::Internal, "the request handler failed"),
                        )
                    }
                },
            }
        }
    };
    let mut frame = response.to_frame(request_id);
    if let Err(error) = frame.check_size() {
        frame = Response::error(
            ErrorCode::Internal,
            format!("the response is too large: {error}"),
        )
        .to_frame(request_id);
    }
    if let Err(error) = send.write_all(&frame.to_bytes()).await {
        tracing::debug!(%error, "cannot write the response");
        return;
    }
    let _ = send.finish();
    // Wait until the peer has the whole response (or is gone) before dropping the stream.
    let _ = send.stopped().await;
}
