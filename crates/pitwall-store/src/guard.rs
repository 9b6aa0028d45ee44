//! The boundary between Pitwall and redb for damaged files.
//!
//! On some damaged files redb panics (an `unreachable!` in its B-tree cursor, assertions in
//! debug builds) instead of returning an error. Every call into redb that reads the file runs
//! inside [`guarded`], which turns such a panic into [`StoreError::Damaged`] naming the file, so
//! the server stops with a message and a way out instead of a task panic and a backtrace.

use std::cell::{Cell, RefCell};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::Once;

use crate::embedded::StoreError;

thread_local! {
    /// Whether this thread is inside [`guarded`]: its panics are reported as errors, not printed.
    static GUARDED: Cell<bool> = const { Cell::new(false) };
    /// The message of the last panic caught on this thread.
    static CAUGHT: RefCell<Option<String>> = const { RefCell::new(None) };
}

static HOOK: Once = Once::new();

/// Runs `call`; a panic inside it becomes [`StoreError::Damaged`] for the file at `path`.
pub(crate) fn guarded<T>(
    path: &Path,
    call: impl FnOnce() -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    install_hook();
    let outer = GUARDED.with(|guarded| guarded.replace(true));
    let result = catch_unwind(AssertUnwindSafe(call));
    GUARDED.with(|guarded| guarded.set(outer));
    result.unwrap_or_else(|payload| {
        let message = CAUGHT
            .with(|caught| caught.borrow_mut().take())
            .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_owned());
        Err(StoreError::Damaged {
            path: path.to_owned(),
            detail: format!("the storage engine failed reading it ({message})"),
        })
    })
}

/// Keeps panics inside [`guarded`] off standard error (they become an error message); every
/// other panic goes to the hook that was there before.
fn install_hook() {
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if GUARDED.with(Cell::get) {
                let location = info
                    .location()
                    .map(|l| format!(" at {}:{}", l.file(), l.line()))
                    .unwrap_or_default();
                let message = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "panic".to_owned());
                CAUGHT.with(|caught| *caught.borrow_mut() = Some(format!("{message}{location}")));
            } else {
                previous(info);
            }
        }));
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_inside_the_boundary_is_an_error_naming_the_file() {
        let result: Result<(), StoreError> = guarded(Path::new("/data/pitwall.redb"), || {
            unreachable!("damaged page")
        });
        let message = result.unwrap_err().to_string();
        assert!(message.contains("/data/pitwall.redb"), "{message}");
        assert!(message.contains("damaged page"), "{message}");
    }
}
