//! Admin actions as annotations on a HaGroup, the Kubernetes way of asking the operator for a
//! switchover, a forced activation, a split-brain resolution, maintenance or a verify.
//!
//! One annotation per kind of action, whose value is a comma-separated list of `key=value`
//! pairs: the request id and the action's argument, named as in the node API's
//! [`AdminActionKind`]:
//!
//! | annotation | value |
//! |---|---|
//! | `hapair.dev/switchover` | `id=r1,to=db2` |
//! | `hapair.dev/force-active` | `id=r2,node=db1` |
//! | `hapair.dev/resolve-split-brain` | `id=r3,winner=db1` |
//! | `hapair.dev/maintenance` | `id=r4,enabled=true` |
//! | `hapair.dev/verify` | `id=r5,volume=pgdata` |
//!
//! The operator delivers the action to the agents, records the outcome in
//! `status.lastAction` (with the same id) and then removes the annotation. The id makes a
//! retry idempotent and lets `kubectl hapair` find its own outcome. Parsing is pure.

use std::collections::BTreeMap;

use hapair_crds::nodeapi::AdminActionKind;
use hapair_crds::validation::is_valid_name;

use crate::controller::views::ActionRequest;

pub const SWITCHOVER: &str = "hapair.dev/switchover";
pub const FORCE_ACTIVE: &str = "hapair.dev/force-active";
pub const RESOLVE_SPLIT_BRAIN: &str = "hapair.dev/resolve-split-brain";
pub const MAINTENANCE: &str = "hapair.dev/maintenance";
pub const VERIFY: &str = "hapair.dev/verify";

/// Every action annotation, in the order the operator handles them.
pub const ALL: [&str; 5] = [SWITCHOVER, FORCE_ACTIVE, RESOLVE_SPLIT_BRAIN, MAINTENANCE, VERIFY];

/// An action annotation that cannot be read. The message names the annotation and the key.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("annotation {annotation}: {message}")]
pub struct AnnotationError {
    pub annotation: String,
    /// The request id, when the value got far enough to name one.
    pub id: Option<String>,
    pub message: String,
}

/// A request read from an annotation: always with an id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnnotatedAction {
    pub annotation: &'static str,
    /// The annotation's value exactly as found, so that removing it can check it is still
    /// the same request.
    pub value: String,
    pub id: String,
    pub kind: AdminActionKind,
}

impl AnnotatedAction {
    pub fn request(&self) -> ActionRequest {
        ActionRequest { id: Some(self.id.clone()), kind: self.kind.clone() }
    }
}

/// The annotation that carries an action of this kind.
pub fn annotation_for(kind: &AdminActionKind) -> &'static str {
    match kind {
        AdminActionKind::Switchover { .. } => SWITCHOVER,
        AdminActionKind::ForceActive { .. } => FORCE_ACTIVE,
        AdminActionKind::ResolveSplitBrain { .. } => RESOLVE_SPLIT_BRAIN,
        AdminActionKind::Maintenance { .. } => MAINTENANCE,
        AdminActionKind::Verify { .. } => VERIFY,
    }
}

/// The annotation value asking for `kind` under request id `id`.
pub fn render(id: &str, kind: &AdminActionKind) -> String {
    match kind {
        AdminActionKind::Switchover { to } => format!("id={id},to={to}"),
        AdminActionKind::ForceActive { node } => format!("id={id},node={node}"),
        AdminActionKind::ResolveSplitBrain { winner } => format!("id={id},winner={winner}"),
        AdminActionKind::Maintenance { enabled } => format!("id={id},enabled={enabled}"),
        AdminActionKind::Verify { volume } => format!("id={id},volume={volume}"),
    }
}

/// Every action annotation among `annotations`, each parsed or refused.
pub fn actions_in(annotations: &BTreeMap<String, String>) -> Vec<Result<AnnotatedAction, AnnotationError>> {
    ALL.iter().filter_map(|name| annotations.get(*name).map(|value| parse(name, value))).collect()
}

/// Reads the value of action annotation `annotation`.
pub fn parse(annotation: &str, value: &str) -> Result<AnnotatedAction, AnnotationError> {
    let Some(name) = ALL.iter().copied().find(|a| *a == annotation) else {
        return Err(AnnotationError {
            annotation: annotation.to_string(),
            id: None,
            message: format!("not an action annotation (expected one of {})", ALL.join(", ")),
        });
    };
    let mut fields: BTreeMap<&str, &str> = BTreeMap::new();
    let mut problems = Vec::new();
    for pair in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                if fields.insert(k.trim(), v.trim()).is_some() {
                    problems.push(format!("{} is given twice", k.trim()));
                }
            }
            _ => problems.push(format!("{pair:?} is not key=value")),
        }
    }
    let id = fields.get("id").map(|s| s.to_string());
    let fail = |message: String| AnnotationError { annotation: name.to_string(), id: id.clone(), message };
    if let Some(problem) = problems.into_iter().next() {
        return Err(fail(problem));
    }
    let argument = match name {
        SWITCHOVER => "to",
        FORCE_ACTIVE => "node",
        RESOLVE_SPLIT_BRAIN => "winner",
        VERIFY => "volume",
        _ => "enabled",
    };
    if let Some(unknown) = fields.keys().find(|k| **k != "id" && **k != argument) {
        return Err(fail(format!("unknown key {unknown:?} (expected id and {argument})")));
    }
    let Some(id_text) = fields.get("id") else {
        return Err(fail(format!("id is missing; write e.g. id=r1,{argument}=…")));
    };
    if !is_valid_name(id_text) {
        return Err(fail(format!("id: {id_text:?} is not a valid request id (lowercase letters, digits and '-')")));
    }
    let Some(arg) = fields.get(argument).copied() else {
        return Err(fail(format!("{argument} is missing")));
    };
    let kind = match name {
        SWITCHOVER => AdminActionKind::Switchover { to: node_name(argument, arg).map_err(&fail)? },
        FORCE_ACTIVE => AdminActionKind::ForceActive { node: node_name(argument, arg).map_err(&fail)? },
        RESOLVE_SPLIT_BRAIN => AdminActionKind::ResolveSplitBrain { winner: node_name(argument, arg).map_err(&fail)? },
        VERIFY if is_valid_name(arg) => AdminActionKind::Verify { volume: arg.to_string() },
        VERIFY => return Err(fail(format!("volume: {arg:?} is not a valid volume name"))),
        _ => AdminActionKind::Maintenance {
            enabled: match arg {
                "true" | "on" => true,
                "false" | "off" => false,
                other => return Err(fail(format!("enabled: {other:?} is not true or false"))),
            },
        },
    };
    Ok(AnnotatedAction { annotation: name, value: value.to_string(), id: id_text.to_string(), kind })
}

fn node_name(field: &str, value: &str) -> Result<String, String> {
    if is_valid_name(value) {
        Ok(value.to_string())
    } else {
        Err(format!("{field}: {value:?} is not a valid node name"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips_through_its_annotation() {
        let kinds = [
            AdminActionKind::Switchover { to: "db2".into() },
            AdminActionKind::ForceActive { node: "db1".into() },
            AdminActionKind::ResolveSplitBrain { winner: "db1".into() },
            AdminActionKind::Maintenance { enabled: true },
            AdminActionKind::Maintenance { enabled: false },
            AdminActionKind::Verify { volume: "pgdata".into() },
        ];
        for kind in kinds {
            let value = render("r1", &kind);
            let parsed = parse(annotation_for(&kind), &value).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!((parsed.id.as_str(), &parsed.kind, parsed.value.as_str()), ("r1", &kind, value.as_str()));
        }
    }

    #[test]
    fn accepts_spaces_and_any_order() {
        let parsed = parse(SWITCHOVER, " to=db2 , id=abc ").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parsed.kind, AdminActionKind::Switchover { to: "db2".into() });
        assert_eq!(parsed.request().id.as_deref(), Some("abc"));
        let on = parse(MAINTENANCE, "id=m,enabled=on").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(on.kind, AdminActionKind::Maintenance { enabled: true });
    }

    #[test]
    fn refusals_name_the_annotation_and_the_key() {
        let error = |annotation: &str, value: &str| parse(annotation, value).err().map(|e| e.to_string());
        assert_eq!(
            error(SWITCHOVER, "to=db2"),
            Some("annotation hapair.dev/switchover: id is missing; write e.g. id=r1,to=…".into())
        );
        assert_eq!(error(SWITCHOVER, "id=r1"), Some("annotation hapair.dev/switchover: to is missing".into()));
        assert_eq!(
            error(SWITCHOVER, "id=r1,to=db2,node=x"),
            Some("annotation hapair.dev/switchover: unknown key \"node\" (expected id and to)".into())
        );
        assert_eq!(
            error(MAINTENANCE, "id=r1,enabled=maybe"),
            Some("annotation hapair.dev/maintenance: enabled: \"maybe\" is not true or false".into())
        );
        assert_eq!(
            error(FORCE_ACTIVE, "id=R_1,node=db1"),
            Some(
                "annotation hapair.dev/force-active: id: \"R_1\" is not a valid request id (lowercase letters, digits and '-')"
                    .into()
            )
        );
        assert_eq!(
            error(RESOLVE_SPLIT_BRAIN, "id=r1,winner=DB1"),
            Some("annotation hapair.dev/resolve-split-brain: winner: \"DB1\" is not a valid node name".into())
        );
        assert_eq!(
            error(SWITCHOVER, "id=r1,id=r2,to=a"),
            Some("annotation hapair.dev/switchover: id is given twice".into())
        );
        assert_eq!(
            error(VERIFY, "id=r1,volume=Pg Data"),
            Some("annotation hapair.dev/verify: volume: \"Pg Data\" is not a valid volume name".into())
        );
        assert_eq!(error(SWITCHOVER, "db2"), Some("annotation hapair.dev/switchover: \"db2\" is not key=value".into()));
        let refused = parse(SWITCHOVER, "id=r9,to=Bad").err();
        assert_eq!(refused.and_then(|e| e.id), Some("r9".to_string()), "the id is kept to record the refusal");
    }

    #[test]
    fn finds_only_action_annotations() {
        let annotations: BTreeMap<String, String> = [
            ("kubectl.kubernetes.io/last-applied-configuration".to_string(), "{}".to_string()),
            (MAINTENANCE.to_string(), "id=m1,enabled=true".to_string()),
            (SWITCHOVER.to_string(), "id=s1,to=b".to_string()),
        ]
        .into();
        let found: Vec<String> = actions_in(&annotations).into_iter().filter_map(|a| a.ok().map(|a| a.id)).collect();
        assert_eq!(found, ["s1", "m1"]);
    }
}
