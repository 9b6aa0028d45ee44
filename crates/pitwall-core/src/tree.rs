//! Associate trees: a session's associates (children) and the sessions naming it as an
//! associate (parents), each followed recursively.

use pitwall_proto::feed::SessionNode;

use crate::projection::Projection;

/// Levels followed in each direction when the request asks for no particular depth, and at
/// most.
pub const MAX_TREE_DEPTH: u32 = 16;

/// Nodes in one tree at most: a wide graph stops growing here (the rest is cut off as if the
/// depth were reached) so one request cannot build an unbounded answer.
pub const MAX_TREE_NODES: usize = 10_000;

#[derive(Clone, Copy)]
enum Direction {
    Children,
    Parents,
}

/// The tree around `session_key`, or `None` if there is no such session.
pub fn session_tree(projection: &Projection, session_key: &str, depth: u32) -> Option<SessionNode> {
    let root = projection.get(session_key)?;
    let depth = match depth {
        0 => MAX_TREE_DEPTH,
        d => d.min(MAX_TREE_DEPTH),
    };
    let mut budget = MAX_TREE_NODES;
    let mut path = vec![session_key.to_owned()];
    let children = expand(
        projection,
        &root.associates,
        Direction::Children,
        depth,
        &mut path,
        &mut budget,
    );
    let parents = expand(
        projection,
        projection.parents_of(session_key),
        Direction::Parents,
        depth,
        &mut path,
        &mut budget,
    );
    Some(SessionNode {
        session_key: session_key.to_owned(),
        session: Some(root.to_view()),
        children,
        parents,
        cycle: false,
    })
}

fn expand(
    projection: &Projection,
    keys: &[String],
    direction: Direction,
    depth: u32,
    path: &mut Vec<String>,
    budget: &mut usize,
) -> Vec<SessionNode> {
    if depth == 0 {
        return Vec::new();
    }
    let mut nodes = Vec::new();
    for key in keys {
        if *budget == 0 {
            break;
        }
        *budget -= 1;
        let session = projection.get(key);
        let mut node = SessionNode {
            session_key: key.clone(),
            session: session.map(|s| s.to_view()),
            ..Default::default()
        };
        if path.contains(key) {
            node.cycle = true;
            nodes.push(node);
            continue;
        }
        if session.is_some() {
            path.push(key.clone());
            let next = match direction {
                Direction::Children => session.map(|s| s.associates.as_slice()).unwrap_or_default(),
                Direction::Parents => projection.parents_of(key),
            };
            let expanded = expand(projection, next, direction, depth - 1, path, budget);
            match direction {
                Direction::Children => node.children = expanded,
                Direction::Parents => node.parents = expanded,
            }
            path.pop();
        }
        nodes.push(node);
    }
    nodes
}

#[cfg(test)]
mod tests {
    use pitwall_proto::open_data::{NewSessionPacket, SessionInfoPacket};
    use prost_types::Timestamp;

    use super::*;
    use crate::record::Record;

    const AT: Timestamp = Timestamp {
        seconds: 1,
        nanos: 0,
    };

    fn create(p: &mut Projection, key: &str, associates: &[&str]) {
        p.apply(
            Record::NewSession {
                session_key: key.into(),
                packet: NewSessionPacket {
                    data_source: "ds".into(),
                    session_info: Some(SessionInfoPacket {
                        associate_session_keys: associates.iter().map(|a| a.to_string()).collect(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            },
            AT,
        );
    }

    fn keys(nodes: &[SessionNode]) -> Vec<&str> {
        nodes.iter().map(|n| n.session_key.as_str()).collect()
    }

    #[test]
    fn children_and_parents_are_followed_both_ways() {
        let mut p = Projection::default();
        create(&mut p, "grandchild", &[]);
        create(&mut p, "child", &["grandchild"]);
        create(&mut p, "root", &["child", "missing"]);
        create(&mut p, "parent", &["root"]);
        create(&mut p, "grandparent", &["parent"]);
        let tree = session_tree(&p, "root", 0).unwrap();
        assert_eq!(keys(&tree.children), ["child", "missing"]);
        assert_eq!(keys(&tree.children[0].children), ["grandchild"]);
        assert!(
            tree.children[1].session.is_none(),
            "unknown associates are listed without a session"
        );
        assert_eq!(keys(&tree.parents), ["parent"]);
        assert_eq!(keys(&tree.parents[0].parents), ["grandparent"]);
        let shallow = session_tree(&p, "root", 1).unwrap();
        assert!(shallow.children[0].children.is_empty());
        assert!(session_tree(&p, "nobody", 0).is_none());
    }

    #[test]
    fn a_cycle_is_marked_and_not_followed() {
        let mut p = Projection::default();
        create(&mut p, "a", &["b"]);
        create(&mut p, "b", &["a"]);
        let tree = session_tree(&p, "a", 0).unwrap();
        let b = &tree.children[0];
        assert_eq!(b.session_key, "b");
        assert!(b.children[0].cycle);
        assert!(b.children[0].children.is_empty());
    }

    #[test]
    fn replacing_associates_updates_the_parents() {
        let mut p = Projection::default();
        create(&mut p, "x", &[]);
        create(&mut p, "y", &[]);
        create(&mut p, "root", &["x"]);
        p.apply(
            Record::SessionInfo {
                session_key: "root".into(),
                packet: SessionInfoPacket {
                    associate_session_keys: vec!["y".into()],
                    ..Default::default()
                },
            },
            AT,
        );
        assert!(session_tree(&p, "x", 0).unwrap().parents.is_empty());
        assert_eq!(keys(&session_tree(&p, "y", 0).unwrap().parents), ["root"]);
        p.apply(
            Record::Purge {
                session_key: "root".into(),
            },
            AT,
        );
        assert!(session_tree(&p, "y", 0).unwrap().parents.is_empty());
    }
}
