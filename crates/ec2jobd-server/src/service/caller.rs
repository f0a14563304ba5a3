//! Who asks: the identity every service function takes. A door (a route, a dashboard page, the
//! schedule ticker, a window, an SNS or SQS intake) turns what it knows about the request into a
//! [`Caller`] and passes it on; the service decides with it (see `policy`). Must not: decide
//! anything itself, or know how a door authenticated its caller.

use ec2jobd_spec::Role;
use ec2jobd_store::{Scopes, TokenInfo};

/// The entry point a request came through (recorded and logged; never a reason to allow more).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Door {
    /// `/v1` with a bearer token.
    Rest,
    /// `/v1` from the `ec2jobd` command-line client (its User-Agent says so).
    Cli,
    /// `/ui` with a session cookie.
    Dashboard,
    /// A schedule's firing (the ticker).
    Schedule,
    /// An office-hours window's reconciliation.
    Window,
    /// An SNS delivery to a webhook.
    Sns,
    /// An SNS delivery read from an SQS queue.
    Sqs,
}

impl Door {
    /// Every door, for tests and tables.
    pub const ALL: [Door; 7] = [
        Door::Rest,
        Door::Cli,
        Door::Dashboard,
        Door::Schedule,
        Door::Window,
        Door::Sns,
        Door::Sqs,
    ];

    /// Doors nobody stands at: what passes them was checked when it was saved (a schedule, a
    /// hook), so they act with the authority saving gave them.
    pub fn unattended(self) -> bool {
        matches!(self, Door::Schedule | Door::Window | Door::Sns | Door::Sqs)
    }

    /// Its name in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Door::Rest => "rest",
            Door::Cli => "cli",
            Door::Dashboard => "dashboard",
            Door::Schedule => "schedule",
            Door::Window => "window",
            Door::Sns => "sns",
            Door::Sqs => "sqs",
        }
    }
}

/// The caller of a service function: who (a token's name, or `schedule:<name>`, `sns:<hook>`,
/// `sqs:<intake>` for the unattended doors), with what role and scopes, through which door.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Recorded as `created_by`, `by` in events and the audit log.
    pub name: String,
    /// What the caller may do.
    pub role: Role,
    /// What it may use beyond its role (empty lists: anything).
    pub scopes: Scopes,
    /// Where it came in.
    pub door: Door,
}

impl Caller {
    /// A token's holder at an interactive door.
    pub fn token(info: TokenInfo, door: Door) -> Caller {
        Caller {
            name: info.name,
            role: info.role,
            scopes: info.scopes,
            door,
        }
    }

    /// An unattended door acting for what was saved (`name` is what its jobs are created by).
    /// It may queue jobs, nothing else: its jobs were checked against whoever saved them.
    pub fn unattended(name: String, door: Door) -> Caller {
        debug_assert!(door.unattended());
        Caller {
            name,
            role: Role::Operator,
            scopes: Scopes::default(),
            door,
        }
    }

    /// The token-shaped view of this caller (what a token made by it is compared with).
    pub fn info(&self) -> (&str, Role, &Scopes) {
        (&self.name, self.role, &self.scopes)
    }
}
