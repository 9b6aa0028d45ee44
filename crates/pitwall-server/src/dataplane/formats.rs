//! Data formats (`DataFormatManagerService`): per data source, which id stands for which
//! ordered parameter list or event.
//!
//! The packet log is the record: an id is given by appending a `DataFormatDefinition` packet
//! (essential, record key `""`) to the data source's main stream, so it also lands in the
//! essentials, where the reference's tools find it. Each data source's formats in memory are
//! what one **follower** task has merged from its essentials, in log order: first a finite read
//! from offset 0 (the rebuild), then a live one from where the rebuild began, so definitions
//! other writers append are merged too. Nothing on the write path waits for a follower.
//!
//! A new id is made under the data source's allocation lock: the follower is first brought up
//! to the end of the essentials (so a definition already stored is found, not duplicated), the
//! definition is appended and made durable, and the follower is brought up to it again before
//! the answer, which is the content's first id in log order: the same answer a restart gives.
//! Every id of a content resolves; ids are scoped per data source and kind. Servers sharing a
//! broker can pick the same tick for different contents: after its definition is merged, an
//! allocation checks that its id is bound to its content, and takes another id when an earlier
//! definition in the log bound it first (which every server keeps, replay included).
//!
//! On the embedded store every data source's formats are rebuilt before the server is ready;
//! on a broker each data source is rebuilt on its first use (a lookup, a new id, a
//! `ReadDataPackets`) and followed from then on, so that a server does not hold one consumer
//! per data source the cluster has ever seen.
//!
//! Packet retention does not lose formats: the embedded log carries the definitions of the
//! essentials it removes forward into the same commit (see the packet log), and a follower
//! keeps every format it merged in memory for as long as the server runs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use pitwall_core::Limits;
use pitwall_core::data_filter::FormatLookup;
use pitwall_core::data_format::{ContentKey, DEFINITION_TYPE, FormatContent, FormatKind};
use pitwall_proto::api::data_format_manager_service_server::DataFormatManagerService;
use pitwall_proto::api::{
    GetEventDataFormatIdRequest, GetEventDataFormatIdResponse, GetEventRequest, GetEventResponse,
    GetParameterDataFormatIdRequest, GetParameterDataFormatIdResponse, GetParametersListRequest,
    GetParametersListResponse,
};
use pitwall_proto::open_data::{DataFormatDefinitionPacket, Packet};
use pitwall_proto::raw_packet::PacketHeader;
use prost::Message;
use prost::bytes::Bytes;
use prost_types::Timestamp;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};
use tracing::{debug, error, info, warn};

use super::{DataPlane, invalid, status_of};
use crate::clock::Clock;
use crate::log::packets::{
    PacketLog, PacketLogError, PacketWrite, ReadPacket, ReadPlan, ReadSpace, Space, Start,
};
use crate::metrics::Metrics;
use crate::service::answer_status;

/// .NET `DateTime.Ticks` (100 ns since 0001-01-01) at the Unix epoch: ids have the magnitude
/// of the reference's.
const TICKS_AT_UNIX_EPOCH: u64 = 621_355_968_000_000_000;

/// How long a follower may take to merge what the essentials held when asked, before the
/// caller goes on without it. It merges in microseconds when running; the bound covers a
/// follower that cannot reach the end (packets removed before it read them).
const SYNC_PATIENCE: Duration = Duration::from_secs(5);

/// Ids one request tries before giving up, when other servers take each one first (ids are
/// clock ticks, so two servers allocating at the same tick pick the same id).
const MAX_ALLOCATIONS: usize = 8;

/// How long a follower waits before reading again after the packet log failed a read.
const RETRY_READ: Duration = Duration::from_secs(1);

/// Why a data format id was not given.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error(transparent)]
    Log(#[from] PacketLogError),
    #[error(
        "no data format id is left above {0}, the highest one stored; the ids of this data \
         directory are exhausted"
    )]
    Exhausted(u64),
    #[error("{0} ids in a row were taken by other servers at the same time; retry")]
    Contended(usize),
}

/// The data formats of every data source, and the followers that keep them.
pub struct Formats {
    packets: Arc<dyn PacketLog>,
    clock: Clock,
    metrics: Metrics,
    /// A `std` lock: held to find or add a data source, never across an await.
    sources: RwLock<HashMap<String, Arc<SourceFormats>>>,
    /// The highest id given or merged: new ids are above it, so they only grow, within a run
    /// and across restarts. A `std` mutex: held for one comparison.
    last_id: Mutex<u64>,
    /// The data sources the startup rebuild reads; new ids wait until they are merged.
    startup: Mutex<Vec<Arc<SourceFormats>>>,
    followers: TaskTracker,
    stopping: CancellationToken,
}

/// The formats of one data source.
pub struct SourceFormats {
    data_source: String,
    /// A `std` lock: held for a lookup or a merge, never across an await.
    known: RwLock<Known>,
    /// How far the follower has merged the essentials.
    progress: watch::Sender<Progress>,
    /// Held while an id is made for this data source, across the append: two callers with the
    /// same new content get one id.
    allocation: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct Known {
    /// Content → its ids, in the order they were merged; the first one is the answer.
    by_key: HashMap<ContentKey, Vec<u64>>,
    by_id: HashMap<(FormatKind, u64), Arc<FormatContent>>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Progress {
    /// The rebuild (the finite read from offset 0) is done.
    rebuilt: bool,
    /// The essentials offset after the last packet merged.
    next: u64,
}

impl SourceFormats {
    fn first_id(&self, key: &ContentKey) -> Option<u64> {
        let known = self.known.read().unwrap_or_else(|e| e.into_inner());
        known.by_key.get(key).and_then(|ids| ids.first().copied())
    }

    fn get(&self, kind: FormatKind, id: u64) -> Option<Arc<FormatContent>> {
        let known = self.known.read().unwrap_or_else(|e| e.into_inner());
        known.by_id.get(&(kind, id)).cloned()
    }

    /// Waits until the rebuild is done (or its follower is gone).
    async fn rebuilt(&self) {
        let mut progress = self.progress.subscribe();
        let _ = progress.wait_for(|p| p.rebuilt).await;
    }
}

impl FormatLookup for SourceFormats {
    fn lookup(&self, kind: FormatKind, id: u64) -> Option<Arc<FormatContent>> {
        self.get(kind, id)
    }
}

impl Formats {
    pub fn new(packets: Arc<dyn PacketLog>, clock: Clock, metrics: Metrics) -> Arc<Formats> {
        Arc::new(Formats {
            packets,
            clock,
            metrics,
            sources: RwLock::new(HashMap::new()),
            last_id: Mutex::new(0),
            startup: Mutex::new(Vec::new()),
            followers: TaskTracker::new(),
            stopping: CancellationToken::new(),
        })
    }

    /// Starts rebuilding the formats of every data source that has essentials; [`Formats::ready`]
    /// says when it is done.
    pub fn start(self: &Arc<Formats>) {
        let mut startup = Vec::new();
        for data_source in self.packets.data_sources() {
            if self.packets.ends(&data_source).essentials > 0 {
                startup.push(self.follow(&data_source));
            }
        }
        *self.startup.lock().unwrap_or_else(|e| e.into_inner()) = startup;
    }

    /// Waits until the startup rebuild has merged every data source's essentials.
    pub async fn ready(&self) {
        let started = Instant::now();
        let startup = self
            .startup
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for source in &startup {
            source.rebuilt().await;
        }
        let formats: usize = startup
            .iter()
            .map(|s| {
                s.known
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .by_key
                    .len()
            })
            .sum();
        info!(
            data_sources = startup.len(),
            formats,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "data formats rebuilt from the essentials"
        );
    }

    /// Tells every follower to stop, without waiting (a launch abandoned before it was ready).
    pub fn stop(&self) {
        self.stopping.cancel();
    }

    /// Stops every follower.
    pub async fn close(&self) {
        self.stopping.cancel();
        self.followers.close();
        self.followers.wait().await;
    }

    /// The data source's formats, followed from now on.
    fn follow(self: &Arc<Formats>, data_source: &str) -> Arc<SourceFormats> {
        if let Some(source) = self
            .sources
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(data_source)
        {
            return source.clone();
        }
        let mut sources = self.sources.write().unwrap_or_else(|e| e.into_inner());
        if let Some(source) = sources.get(data_source) {
            return source.clone();
        }
        let source = Arc::new(SourceFormats {
            data_source: data_source.to_owned(),
            known: RwLock::new(Known::default()),
            progress: watch::channel(Progress::default()).0,
            allocation: tokio::sync::Mutex::new(()),
        });
        sources.insert(data_source.to_owned(), source.clone());
        let formats = self.clone();
        let follower = source.clone();
        self.followers
            .spawn(async move { formats.run_follower(follower).await });
        source
    }

    /// The data source's formats, rebuilt, when it has any: a data source without essentials
    /// is not followed, so that looking up names that hold nothing costs nothing.
    async fn existing(self: &Arc<Formats>, data_source: &str) -> Option<Arc<SourceFormats>> {
        let followed = self
            .sources
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(data_source)
            .cloned();
        let source = match followed {
            Some(source) => source,
            None if self.packets.ends(data_source).essentials > 0 => self.follow(data_source),
            None => return None,
        };
        source.rebuilt().await;
        Some(source)
    }

    /// What `id` stands for in the data source; `None` when nothing does, once every definition
    /// stored when asked has been merged.
    pub async fn lookup(
        self: &Arc<Formats>,
        data_source: &str,
        kind: FormatKind,
        id: u64,
    ) -> Option<Arc<FormatContent>> {
        let source = self.existing(data_source).await?;
        if let Some(content) = source.get(kind, id) {
            return Some(content);
        }
        self.sync(&source).await;
        source.get(kind, id)
    }

    /// The formats a reader of the data source resolves ids with, brought up to what the
    /// essentials hold now; `None` when the data source has no essentials yet.
    pub async fn resolver(self: &Arc<Formats>, data_source: &str) -> Option<Arc<SourceFormats>> {
        let source = self.existing(data_source).await?;
        self.sync(&source).await;
        Some(source)
    }

    /// The content's first id in the data source; a new one, made durable, when it has none.
    pub async fn id_of(
        self: &Arc<Formats>,
        data_source: &str,
        content: FormatContent,
    ) -> Result<u64, FormatError> {
        let key = content.key();
        let source = self.follow(data_source);
        source.rebuilt().await;
        if let Some(id) = source.first_id(&key) {
            return Ok(id);
        }
        let _allocating = source.allocation.lock().await;
        // Another caller may have made it while this one waited, or it may be stored and not
        // merged yet.
        self.sync(&source).await;
        if let Some(id) = source.first_id(&key) {
            return Ok(id);
        }
        // New ids stay above every id stored: wait until the startup rebuild has seen them.
        self.ready_quietly().await;
        for _ in 0..MAX_ALLOCATIONS {
            let id = self.next_id()?;
            let packet = Packet {
                r#type: DEFINITION_TYPE.into(),
                session_key: String::new(),
                is_essential: true,
                content: content.definition(id).encode_to_vec(),
                id: 0,
            };
            let durable = self.packets.append(vec![PacketWrite {
                data_source: data_source.to_owned(),
                stream: String::new(),
                session_key: String::new(),
                packet: Bytes::from(packet.encode_to_vec()),
                essential: true,
            }])?;
            durable.await.unwrap_or_else(|_| {
                Err(PacketLogError::Unavailable(
                    "the server is shutting down".into(),
                ))
            })?;
            // The follower merges the definition after whatever came before it in the log, so
            // the answer is the one a restart would give.
            self.sync(&source).await;
            if let Some(bound) = source.get(content.kind(), id)
                && *bound != content
            {
                // Another server gave the same id to other content, earlier in the log: the
                // first binding stands on every server, so this content takes another id.
                warn!(%data_source, id, "a data format id was taken by another server; allocating again");
                continue;
            }
            // Merging here too is a no-op after the follower, and keeps read-your-writes should
            // the follower not get there in time.
            self.merge(&source, id, content.clone());
            return Ok(source.first_id(&key).unwrap_or(id));
        }
        Err(FormatError::Contended(MAX_ALLOCATIONS))
    }

    async fn ready_quietly(&self) {
        let startup = self
            .startup
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for source in &startup {
            source.rebuilt().await;
        }
    }

    /// A new id: tick-style (100 ns since 0001-01-01 by the server's clock), above every id
    /// given or merged so far.
    fn next_id(&self) -> Result<u64, FormatError> {
        let mut last = self.last_id.lock().unwrap_or_else(|e| e.into_inner());
        let above = last.checked_add(1).ok_or(FormatError::Exhausted(*last))?;
        let id = ticks(self.clock.now()).max(above);
        *last = id;
        Ok(id)
    }

    /// Waits until the follower has merged everything the essentials held when called.
    async fn sync(&self, source: &SourceFormats) {
        let target = self.packets.ends(&source.data_source).essentials;
        let mut progress = source.progress.subscribe();
        let reached = tokio::time::timeout(
            SYNC_PATIENCE,
            progress.wait_for(|p| p.rebuilt && p.next >= target),
        )
        .await;
        if reached.is_err() {
            warn!(
                data_source = %source.data_source,
                target,
                "the data format follower did not reach the end of the essentials in time"
            );
        }
    }

    /// Adds what a definition binds; a content's ids keep the order they are merged in. An id
    /// already bound to another content keeps its first content.
    fn merge(&self, source: &SourceFormats, id: u64, content: FormatContent) {
        let kind = content.kind();
        let count = {
            let mut known = source.known.write().unwrap_or_else(|e| e.into_inner());
            if let Some(existing) = known.by_id.get(&(kind, id)) {
                if **existing != content {
                    warn!(
                        data_source = %source.data_source,
                        id,
                        "a definition binds an id already bound to another content; the first \
                         binding is kept"
                    );
                }
                return;
            }
            let key = content.key();
            known.by_id.insert((kind, id), Arc::new(content));
            known.by_key.entry(key).or_default().push(id);
            known.by_key.len()
        };
        {
            let mut last = self.last_id.lock().unwrap_or_else(|e| e.into_inner());
            *last = (*last).max(id);
        }
        self.metrics
            .data_formats
            .with_label_values(&[source.data_source.as_str()])
            .set(count as i64);
    }

    /// Merges the definitions among `packets`; returns the offset after the last one.
    fn merge_packets(&self, source: &SourceFormats, packets: Vec<ReadPacket>) -> Option<u64> {
        let next = packets.last().map(|p| p.offset + 1);
        for packet in packets {
            let Ok(header) = PacketHeader::decode(packet.packet) else {
                continue;
            };
            // Any definition counts, whoever wrote it and whatever its session key or
            // is_essential say.
            if header.r#type != DEFINITION_TYPE {
                continue;
            }
            match DataFormatDefinitionPacket::decode(header.content) {
                Ok(definition) => match FormatContent::from_definition(definition) {
                    Some((id, content)) => self.merge(source, id, content),
                    None => debug!(
                        data_source = %source.data_source,
                        offset = packet.offset,
                        "a data format definition without an id or content is skipped"
                    ),
                },
                Err(e) => debug!(
                    data_source = %source.data_source,
                    offset = packet.offset,
                    error = %e,
                    "a data format definition that does not decode is skipped"
                ),
            }
        }
        next
    }

    /// Rebuilds the data source's formats from its essentials, then follows them until
    /// shutdown.
    async fn run_follower(&self, source: Arc<SourceFormats>) {
        let data_source = source.data_source.clone();
        let began = self.packets.ends(&data_source).essentials;
        // The rebuild: a finite read, which ends at the end the essentials had when it began
        // (however much retention removed).
        loop {
            let from = source.progress.borrow().next;
            match self.read(&source, from, true).await {
                Ok(()) => break,
                Err(e) => {
                    error!(%data_source, error = %e, "cannot rebuild data formats; retrying");
                    if self.pause().await {
                        return;
                    }
                }
            }
        }
        source.progress.send_modify(|p| {
            p.rebuilt = true;
            p.next = p.next.max(began);
        });
        if self.stopping.is_cancelled() {
            return;
        }
        loop {
            let from = source.progress.borrow().next;
            match self.read(&source, from, false).await {
                Ok(()) => return,
                Err(e) => {
                    error!(%data_source, error = %e, "cannot follow data formats; retrying");
                    if self.pause().await {
                        return;
                    }
                }
            }
        }
    }

    /// Reads the essentials from `from` and merges them, until the read ends (finite, or
    /// stopped) or fails.
    async fn read(
        &self,
        source: &SourceFormats,
        from: u64,
        finite: bool,
    ) -> Result<(), PacketLogError> {
        let plan = ReadPlan {
            data_source: source.data_source.clone(),
            spaces: vec![ReadSpace {
                space: Space::Essentials,
                label: String::new(),
                start: Start::At(from),
            }],
            session_key: String::new(),
            finite,
            consumer_group: String::new(),
        };
        let mut read = self.packets.read(plan, self.stopping.child_token());
        while let Some(batch) = read.recv().await {
            if let Some(next) = self.merge_packets(source, batch?) {
                source.progress.send_modify(|p| p.next = p.next.max(next));
            }
        }
        Ok(())
    }

    /// Waits before another read; true when the server stops meanwhile.
    async fn pause(&self) -> bool {
        tokio::select! {
            () = self.stopping.cancelled() => true,
            () = tokio::time::sleep(RETRY_READ) => false,
        }
    }
}

/// .NET-style ticks of `time`: 100 ns since 0001-01-01T00:00:00Z.
fn ticks(time: Timestamp) -> u64 {
    let since_epoch = i128::from(time.seconds) * 10_000_000 + i128::from(time.nanos) / 100;
    u64::try_from(i128::from(TICKS_AT_UNIX_EPOCH) + since_epoch).unwrap_or(0)
}

/// `DataFormatManagerService` over the formats.
pub struct FormatService {
    plane: DataPlane,
}

impl FormatService {
    pub fn new(plane: DataPlane) -> FormatService {
        FormatService { plane }
    }

    fn formats(&self) -> Result<&Arc<Formats>, Status> {
        self.plane.packets()?;
        self.plane.formats.as_ref().ok_or_else(|| {
            Status::unavailable("this server keeps no data formats: it has no packet log")
        })
    }

    fn limits(&self) -> &Limits {
        &self.plane.limits
    }

    async fn id_of(&self, data_source: &str, content: FormatContent) -> Result<u64, Status> {
        let formats = self.formats()?;
        self.limits()
            .check_data_source(data_source)
            .map_err(invalid)?;
        content.check(self.limits()).map_err(invalid)?;
        formats
            .id_of(data_source, content)
            .await
            .map_err(|e| match e {
                FormatError::Log(e) => status_of(e),
                e @ FormatError::Exhausted(_) => Status::resource_exhausted(e.to_string()),
                e @ FormatError::Contended(_) => Status::aborted(e.to_string()),
            })
    }

    /// A lookup answers empty for an unknown id (or data source), as the reference does.
    async fn lookup(
        &self,
        data_source: &str,
        kind: FormatKind,
        id: u64,
    ) -> Result<Option<Arc<FormatContent>>, Status> {
        let formats = self.formats()?;
        self.limits()
            .check_data_source(data_source)
            .map_err(invalid)?;
        Ok(formats.lookup(data_source, kind, id).await)
    }
}

#[tonic::async_trait]
impl DataFormatManagerService for FormatService {
    async fn get_parameter_data_format_id(
        &self,
        request: Request<GetParameterDataFormatIdRequest>,
    ) -> Result<Response<GetParameterDataFormatIdResponse>, Status> {
        let started = Instant::now();
        let request = request.into_inner();
        let result = self
            .id_of(
                &request.data_source,
                FormatContent::Parameters(request.parameters),
            )
            .await
            .map(|id| GetParameterDataFormatIdResponse {
                data_format_identifier: id,
            });
        answer_status(
            &self.plane.metrics,
            "GetParameterDataFormatId",
            started,
            result,
        )
    }

    async fn get_event_data_format_id(
        &self,
        request: Request<GetEventDataFormatIdRequest>,
    ) -> Result<Response<GetEventDataFormatIdResponse>, Status> {
        let started = Instant::now();
        let request = request.into_inner();
        let result = self
            .id_of(&request.data_source, FormatContent::Event(request.event))
            .await
            .map(|id| GetEventDataFormatIdResponse {
                data_format_identifier: id,
            });
        answer_status(&self.plane.metrics, "GetEventDataFormatId", started, result)
    }

    async fn get_parameters_list(
        &self,
        request: Request<GetParametersListRequest>,
    ) -> Result<Response<GetParametersListResponse>, Status> {
        let started = Instant::now();
        let request = request.into_inner();
        let result = self
            .lookup(
                &request.data_source,
                FormatKind::Parameters,
                request.data_format_identifier,
            )
            .await
            .map(|content| GetParametersListResponse {
                parameters: match content.as_deref() {
                    Some(FormatContent::Parameters(parameters)) => parameters.clone(),
                    _ => Vec::new(),
                },
            });
        answer_status(&self.plane.metrics, "GetParametersList", started, result)
    }

    async fn get_event(
        &self,
        request: Request<GetEventRequest>,
    ) -> Result<Response<GetEventResponse>, Status> {
        let started = Instant::now();
        let request = request.into_inner();
        let result = self
            .lookup(
                &request.data_source,
                FormatKind::Event,
                request.data_format_identifier,
            )
            .await
            .map(|content| GetEventResponse {
                event: match content.as_deref() {
                    Some(FormatContent::Event(event)) => event.clone(),
                    _ => String::new(),
                },
            });
        answer_status(&self.plane.metrics, "GetEvent", started, result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_the_magnitude_of_dotnet_ticks() {
        // 2025-01-01T00:00:00Z is 638,712,864,000,000,000 ticks in .NET.
        let new_year = Timestamp {
            seconds: 1_735_689_600,
            nanos: 0,
        };
        assert_eq!(ticks(new_year), 638_712_864_000_000_000);
        assert_eq!(
            ticks(Timestamp {
                seconds: 0,
                nanos: 250
            }),
            TICKS_AT_UNIX_EPOCH + 2
        );
    }
}
