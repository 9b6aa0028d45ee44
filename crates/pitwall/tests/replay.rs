//! Property: any sequence of operations, applied live and then read back after a restart on the
//! same data directory, gives the same state.

mod support;

use std::collections::BTreeMap;

use pitwall_proto::api::*;
use proptest::prelude::*;
use support::*;

#[derive(Debug, Clone)]
enum Op {
    Create {
        data_source: usize,
        identifier: String,
        details: BTreeMap<String, String>,
        associates: Vec<String>,
    },
    End(usize),
    UpdateIdentifier(usize, String),
    AddAssociate(usize, String),
    UpdateDetails(usize, BTreeMap<String, String>),
}

/// Data sources, one of them invalid so refused creates are part of the mix.
const DATA_SOURCES: [&str; 3] = ["alpha", "beta", "not valid"];

fn small_text() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), "[a-c]{1,3}"]
}

fn details() -> impl Strategy<Value = BTreeMap<String, String>> {
    // Keys may be empty: such updates are refused and must leave no trace.
    prop::collection::btree_map("[a-c]{0,2}", "[x-z]{0,2}", 0..4)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..DATA_SOURCES.len(), small_text(), details(), prop::collection::vec(small_text(), 0..3))
            .prop_map(|(data_source, identifier, details, associates)| Op::Create {
                data_source,
                identifier,
                details,
                associates,
            }),
        1 => any::<usize>().prop_map(Op::End),
        1 => (any::<usize>(), small_text()).prop_map(|(i, s)| Op::UpdateIdentifier(i, s)),
        1 => (any::<usize>(), small_text()).prop_map(|(i, s)| Op::AddAssociate(i, s)),
        2 => (any::<usize>(), details()).prop_map(|(i, d)| Op::UpdateDetails(i, d)),
    ]
}

/// The key an operation targets: one of the created sessions, or an unknown key if none.
fn target(keys: &[String], index: usize) -> String {
    if keys.is_empty() {
        "unknown-session".to_owned()
    } else {
        keys[index % keys.len()].clone()
    }
}

async fn apply(client: &mut Client, ops: Vec<Op>) {
    let mut keys = Vec::new();
    for op in ops {
        match op {
            Op::Create {
                data_source,
                identifier,
                details,
                associates,
            } => {
                let response = client
                    .create_session(CreateSessionRequest {
                        data_source: DATA_SOURCES[data_source].into(),
                        identifier,
                        details,
                        associate_session_key: associates,
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                if response.success {
                    keys.push(response.session_key);
                }
            }
            Op::End(i) => {
                end(client, &target(&keys, i)).await;
            }
            Op::UpdateIdentifier(i, identifier) => {
                client
                    .update_session_identifier(UpdateSessionIdentifierRequest {
                        session_key: target(&keys, i),
                        identifier,
                    })
                    .await
                    .unwrap();
            }
            Op::AddAssociate(i, associate_session_key) => {
                client
                    .add_associate_session(AddAssociateSessionRequest {
                        session_key: target(&keys, i),
                        associate_session_key,
                    })
                    .await
                    .unwrap();
            }
            Op::UpdateDetails(i, details) => {
                client
                    .update_session_details(UpdateSessionDetailsRequest {
                        session_key: target(&keys, i),
                        details,
                    })
                    .await
                    .unwrap();
            }
        }
    }
}

async fn state(
    client: &mut Client,
) -> BTreeMap<String, (Vec<String>, Vec<GetSessionInfoResponse>)> {
    let mut state = BTreeMap::new();
    // GetCurrentSessions refuses the invalid name, which can hold no session anyway.
    for data_source in &DATA_SOURCES[..2] {
        let keys = list(client, data_source).await;
        let mut infos = Vec::new();
        for key in &keys {
            infos.push(info(client, key).await);
        }
        state.insert((*data_source).to_owned(), (keys, infos));
    }
    state
}

/// The data sources of every session (pitwall.v1 ListSessions over all of them).
async fn data_sources_in_use(server: &TestServer) -> std::collections::BTreeSet<String> {
    let page = server
        .feed()
        .await
        .list_sessions(pitwall_proto::feed::ListSessionsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(page.next_page_token.is_empty());
    page.sessions.into_iter().map(|s| s.data_source).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn live_state_equals_state_after_restart(ops in prop::collection::vec(op(), 1..40)) {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let (live, restored, used) = runtime.block_on(async {
            let server = TestServer::start().await;
            let mut client = server.client().await;
            apply(&mut client, ops).await;
            let live = state(&mut client).await;
            let used = data_sources_in_use(&server).await;
            let server = server.restart().await;
            let mut client = server.client().await;
            let restored = state(&mut client).await;
            (live, restored, used)
        });
        prop_assert!(!used.contains("not valid"));
        prop_assert_eq!(live, restored);
    }
}
