//! Background tasks that live as long as the pipeline (partition producers, the credential
//! refresher): each is spawned through [`Background`], and its end is reported to the app,
//! which treats a task that ends before shutdown (returned or panicked) as a pipeline
//! failure. Nothing is a bare `tokio::spawn` that could die silently.

use std::future::Future;

use tokio::sync::mpsc;

/// Spawns named background tasks and reports when one ends.
#[derive(Debug, Clone)]
pub struct Background {
    ended: mpsc::UnboundedSender<Ended>,
}

/// A background task that ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    /// The task's name, e.g. `kafka producer orders/2`.
    pub name: String,
    /// The panic message, when it panicked.
    pub panic: Option<String>,
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.panic {
            Some(p) => write!(f, "background task {:?} panicked: {p}", self.name),
            None => write!(f, "background task {:?} ended unexpectedly", self.name),
        }
    }
}

/// Where ended tasks are reported.
#[derive(Debug)]
pub struct Watch {
    rx: mpsc::UnboundedReceiver<Ended>,
}

impl Watch {
    /// The next task that ended; pending forever once no task can end any more.
    pub async fn next(&mut self) -> Ended {
        match self.rx.recv().await {
            Some(e) => e,
            None => std::future::pending().await,
        }
    }
}

impl Background {
    /// A spawner and the watch its tasks report to.
    pub fn new() -> (Self, Watch) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self { ended: tx }, Watch { rx })
    }

    /// Spawns `task`; when it ends (or panics), the watch hears of it.
    pub fn spawn(&self, name: String, task: impl Future<Output = ()> + Send + 'static) {
        let handle = tokio::spawn(task);
        let ended = self.ended.clone();
        tokio::spawn(async move {
            let panic = match handle.await {
                Ok(()) => None,
                Err(e) if e.is_panic() => {
                    let p = e.into_panic();
                    Some(
                        p.downcast_ref::<&str>()
                            .map(|s| (*s).to_owned())
                            .or_else(|| p.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "(no message)".into()),
                    )
                }
                Err(_) => Some("cancelled".into()),
            };
            let _ = ended.send(Ended { name, panic });
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_task_that_ends_or_panics_is_reported_by_name() {
        let (bg, mut watch) = Background::new();
        bg.spawn("returns".into(), async {});
        let first = watch.next().await;
        assert_eq!(
            first,
            Ended {
                name: "returns".into(),
                panic: None
            }
        );
        bg.spawn("panics".into(), async { panic!("boom") });
        let second = watch.next().await;
        assert_eq!(second.name, "panics");
        assert_eq!(second.panic.as_deref(), Some("boom"));
        assert!(second.to_string().contains("\"panics\" panicked: boom"));
    }
}
