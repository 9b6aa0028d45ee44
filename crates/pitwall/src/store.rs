//! `pitwall store check` and `pitwall store repair`: the embedded store's integrity, on a stopped
//! server's data directory (a running server holds its lock, and both refuse).

use std::process::ExitCode;

use pitwall_store::integrity::{self, Integrity, Report};

use crate::cli::{StoreArgs, StoreCommand};
use crate::output;

/// Exit codes: 0 all is well (or repaired), 1 damage found (or left), 2 could not look.
pub fn run(args: StoreArgs) -> ExitCode {
    let (repairing, data_dir) = match &args.command {
        StoreCommand::Check { data_dir } => (false, data_dir),
        StoreCommand::Repair { data_dir } => (true, data_dir),
    };
    let outcome = if repairing {
        integrity::repair(data_dir)
    } else {
        integrity::check(data_dir)
    };
    let report = match outcome {
        Ok(report) => report,
        Err(e) => {
            eprintln!("pitwall: {}", output::escape(&e.to_string()));
            return ExitCode::from(2);
        }
    };
    print_report(&report, repairing);
    let damaged_left = match (&report.integrity, repairing) {
        (Integrity::Damaged(_), _) => true,
        (_, true) => false,
        (_, false) => !report.is_clean(),
    };
    if damaged_left {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn print_report(report: &Report, repairing: bool) {
    output::text(&format!("store file {}", report.path.display()));
    if report.needed_recovery {
        output::text(
            "not closed cleanly (a crash or kill): opening it recovers the last commit, as a \
             server start does",
        );
    }
    let pages = match (&report.integrity, repairing) {
        (Integrity::Clean, _) => "pages: every page verifies (redb integrity check)".to_owned(),
        (Integrity::Repairable, false) => {
            "pages: DAMAGED; redb can repair it: run `pitwall store repair`".to_owned()
        }
        (Integrity::Repairable, true) => {
            "pages: were damaged; repaired, and every page verifies now".to_owned()
        }
        (Integrity::Damaged(why), _) => format!(
            "pages: DAMAGED beyond repair ({why}); restore the file from a backup, or move it \
             aside to start with an empty store"
        ),
    };
    output::text(&pages);
    if let (Integrity::Damaged(_), true) = (&report.integrity, report.damaged_rows.is_empty()) {
        return;
    }
    output::text(&format!(
        "rows: {} sessions and {} feed events verify",
        report.sessions, report.feed_events
    ));
    for row in &report.damaged_rows {
        if repairing {
            output::text(&format!("removed damaged row: {row}"));
        } else {
            output::text(&format!("DAMAGED row: {row}"));
        }
    }
    if !repairing && !report.damaged_rows.is_empty() {
        output::text(&format!(
            "{} damaged row(s): `pitwall store repair` removes them, which also repairs the \
             pages damaged only there (copy the file first to keep them), or start the server \
             with --skip-damaged-rows to leave them out",
            report.damaged_rows.len()
        ));
    }
    if report.is_clean() {
        output::text("the store is sound");
    }
}
