//! Which queued job goes to which host: first-fit in arrival order onto the best-fitting host.

use crate::jobs::Job;
use crate::labels::DEFAULT_SHAPE;
use crate::store::Host;

/// Room left on a host while a placement round runs.
#[derive(Debug, Clone)]
struct Room {
    host_id: String,
    vcpus: u32,
    memory_mb: u64,
    images: Vec<String>,
}

/// Plans `(job id, host id)` pairs. Jobs are taken in queue order; each goes to the host where
/// it fits most tightly (fewest vCPUs, then least memory left over), which keeps big holes free
/// for big jobs. A job that fits nowhere waits without blocking smaller jobs behind it. A host
/// that lists labels only takes jobs whose image is among them.
pub fn plan(queue: &[Job], hosts: &[Host]) -> Vec<(u64, String)> {
    let mut rooms: Vec<Room> = hosts
        .iter()
        .filter(|h| h.state.takes_jobs())
        .map(|h| Room {
            host_id: h.id.clone(),
            vcpus: h.vcpus.saturating_sub(h.used_vcpus),
            memory_mb: h.memory_mb.saturating_sub(h.used_memory_mb),
            images: h.labels.clone(),
        })
        .collect();
    let mut out = Vec::new();
    for job in queue {
        let shape = job.shape.unwrap_or(DEFAULT_SHAPE);
        let (vcpus, need_mb) = (u32::from(shape.vcpus()), shape.memory_mib());
        let image = job.image.as_deref().unwrap_or_default();
        let best = rooms
            .iter_mut()
            .filter(|r| r.vcpus >= vcpus && r.memory_mb >= need_mb)
            .filter(|r| r.images.is_empty() || r.images.iter().any(|i| i == image))
            .min_by_key(|r| (r.vcpus - vcpus, r.memory_mb - need_mb));
        if let Some(room) = best {
            room.vcpus -= vcpus;
            room.memory_mb -= need_mb;
            out.push((job.id, room.host_id.clone()));
        }
    }
    out
}

/// Where a running job's VM can move: the best fit among the hosts taking jobs, leaving out
/// `exclude` (its own host, targets that failed it before).
pub fn target_for(job: &Job, hosts: &[Host], exclude: &[String]) -> Option<String> {
    let candidates: Vec<Host> = hosts
        .iter()
        .filter(|h| !exclude.contains(&h.id))
        .cloned()
        .collect();
    plan(std::slice::from_ref(job), &candidates)
        .pop()
        .map(|(_, host)| host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::JobState;
    use crate::labels::Shape;
    use crate::store::HostState;

    fn job(id: u64, vcpus: u64, memory_gb: u64) -> Job {
        Job {
            id,
            run_id: 1,
            run_attempt: 1,
            repository: "o/r".into(),
            installation_id: Some(1),
            labels: vec!["hopper".into()],
            state: JobState::Queued,
            conclusion: None,
            shape: Some(Shape::new(vcpus, memory_gb).unwrap()),
            image: Some("ubuntu-24.04".into()),
            reason: None,
            host_id: None,
            runner_id: None,
            runner_name: None,
            vm_state: None,
            created_at: 0,
            assigned_at: None,
            updated_at: 0,
            migrations: vec![],
        }
    }

    fn host(id: &str, vcpus: u32, memory_gb: u64, used_vcpus: u32) -> Host {
        Host {
            id: id.into(),
            name: id.into(),
            vcpus,
            memory_mb: memory_gb * 1024,
            labels: vec![],
            address: "10.0.0.1".into(),
            state: HostState::Active,
            deadline: None,
            enrolled_at: 0,
            last_heartbeat: 0,
            used_vcpus,
            used_memory_mb: 0,
        }
    }

    #[test]
    fn best_fit_and_waiting_in_order() {
        let hosts = [host("big", 16, 64, 0), host("small", 4, 8, 0)];
        let queue = [job(1, 4, 8), job(2, 16, 64), job(3, 8, 16), job(4, 8, 16)];
        // 1 fits "small" exactly; 2 takes all of "big"; 3 and 4 wait.
        assert_eq!(
            plan(&queue, &hosts),
            vec![(1, "small".into()), (2, "big".into())]
        );
        // A job too big for any host does not block the ones behind it.
        let queue = [job(5, 32, 8), job(6, 2, 2)];
        assert_eq!(plan(&queue, &hosts), vec![(6, "small".into())]);
    }

    #[test]
    fn a_moving_job_goes_elsewhere_and_never_to_a_reclaiming_host() {
        let mut reclaiming = host("r", 16, 64, 0);
        reclaiming.state = HostState::Reclaiming;
        let hosts = [host("src", 8, 32, 4), reclaiming, host("ok", 8, 32, 0)];
        let j = job(1, 4, 8);
        assert_eq!(target_for(&j, &hosts, &["src".into()]), Some("ok".into()));
        assert_eq!(target_for(&j, &hosts, &["src".into(), "ok".into()]), None);
    }

    #[test]
    fn respects_usage_lost_hosts_and_images() {
        let mut lost = host("lost", 64, 256, 0);
        lost.state = HostState::Lost;
        let busy = host("busy", 8, 32, 6);
        assert_eq!(plan(&[job(1, 4, 8)], &[lost.clone(), busy.clone()]), vec![]);
        assert_eq!(
            plan(&[job(1, 2, 8)], &[lost, busy]),
            vec![(1, "busy".into())]
        );
        let mut debian_only = host("deb", 8, 32, 0);
        debian_only.labels = vec!["debian-12".into()];
        assert_eq!(plan(&[job(1, 2, 2)], &[debian_only]), vec![]);
    }
}
