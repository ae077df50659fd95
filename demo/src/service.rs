use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::observed::Observed;
use crate::pb::{self, CollectReply, CollectRequest, CountReply, CountRequest, EchoReply, EchoRequest};

/// The largest message either side of the demo accepts: big enough for the
/// size tests' `reply_padding`, small enough that a typo cannot exhaust memory.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// An `EchoReply`'s bytes besides the message text: two field tags, the
/// text's length prefix (4 bytes up to 64 MiB) and the `execution` varint
/// (at most 10 bytes).
const ECHO_REPLY_FRAMING: usize = 16;

/// The demo service's handlers; every call is recorded in its [`Observed`].
#[derive(Clone, Default)]
pub struct DemoServer {
    observed: Observed,
}

impl DemoServer {
    pub fn new(observed: Observed) -> Self {
        Self { observed }
    }

    /// The tonic service to add to a `Server`, with message limits raised to
    /// [`MAX_MESSAGE_BYTES`].
    pub fn into_service(self) -> pb::demo_server::DemoServer<Self> {
        pb::demo_server::DemoServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

/// Initial metadata on every Echo answer: which execution of Echo answered.
pub const EXECUTION_HEADER: &str = "x-demo-execution";

/// The status a call asked to end with, or `None` for OK. The message names
/// the code so a person reading client or proxy logs can tell a requested
/// failure from a real one; the status details (`grpc-status-details-bin`)
/// name it too, as rich-error servers send them.
fn requested_failure(fail_code: i32) -> Option<Status> {
    match Code::from(fail_code) {
        Code::Ok => None,
        code => Some(Status::with_details(
            code,
            format!("demo failure: {code:?}"),
            format!("demo details: {code:?}").into_bytes().into(),
        )),
    }
}

/// `metadata` with [`EXECUTION_HEADER`] set to `execution`.
fn mark_execution(metadata: &mut tonic::metadata::MetadataMap, execution: u64) {
    metadata.insert(EXECUTION_HEADER, tonic::metadata::MetadataValue::from(execution));
}

#[tonic::async_trait]
impl pb::demo_server::Demo for DemoServer {
    async fn echo(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let execution = self.observed.entered("Echo", request.metadata());
        let request = request.into_inner();
        // Even a zero sleep waits for tokio's next 1 ms timer tick: skip it.
        if request.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(request.delay_ms.into())).await;
        }
        self.observed.completed("Echo");
        if let Some(mut status) = requested_failure(request.fail_code) {
            mark_execution(status.metadata_mut(), execution);
            return Err(status);
        }
        let padding = usize::try_from(request.reply_padding).unwrap_or(usize::MAX);
        let reply_bytes = request.message.len().saturating_add(padding).saturating_add(ECHO_REPLY_FRAMING);
        if reply_bytes > MAX_MESSAGE_BYTES {
            return Err(Status::invalid_argument(format!(
                "reply_padding {padding} would make the reply larger than {MAX_MESSAGE_BYTES} bytes"
            )));
        }
        let mut message = request.message;
        message.extend(std::iter::repeat_n('.', padding));
        let mut response = Response::new(EchoReply { message, execution });
        mark_execution(response.metadata_mut(), execution);
        Ok(response)
    }

    type CountStream = ReceiverStream<Result<CountReply, Status>>;

    async fn count(&self, request: Request<CountRequest>) -> Result<Response<Self::CountStream>, Status> {
        self.observed.entered("Count", request.metadata());
        let request = request.into_inner();
        let observed = self.observed.clone();
        // One slot: each reply waits for the client to take the previous
        // one, so `interval_ms` paces what the client actually receives.
        let (replies, stream) = mpsc::channel(1);
        tokio::spawn(async move {
            for n in 1..=request.count {
                if n > 1 {
                    tokio::time::sleep(Duration::from_millis(request.interval_ms.into())).await;
                }
                if replies.send(Ok(CountReply { n })).await.is_err() {
                    // The client went away; the handler did not finish.
                    return;
                }
            }
            if let Some(status) = requested_failure(request.fail_code) {
                if replies.send(Err(status)).await.is_err() {
                    return;
                }
            }
            observed.completed("Count");
        });
        Ok(Response::new(ReceiverStream::new(stream)))
    }

    async fn collect(&self, request: Request<Streaming<CollectRequest>>) -> Result<Response<CollectReply>, Status> {
        self.observed.entered("Collect", request.metadata());
        let mut values = request.into_inner();
        let mut reply = CollectReply::default();
        while let Some(value) = values.next().await {
            reply.sum += u64::from(value?.value);
            reply.count += 1;
        }
        self.observed.completed("Collect");
        Ok(Response::new(reply))
    }
}
