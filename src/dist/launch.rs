//! Who this process is in a data-parallel job, from the launcher's environment.
//!
//! Each launcher names rank, world size and local rank its own way. The families are tried in a
//! fixed order and the first one present wins, because launchers nest: `mpirun` inside a SLURM
//! allocation inherits the allocation's `SLURM_*` variables, which then describe the batch step
//! and not this process.
//! 1. Open MPI (`mpirun`, and `srun --mpi=pmix` with Open MPI): `OMPI_COMM_WORLD_RANK`,
//!    `OMPI_COMM_WORLD_SIZE`, `OMPI_COMM_WORLD_LOCAL_RANK`;
//! 2. MPICH / Intel MPI (Hydra's PMI): `PMI_RANK`, `PMI_SIZE`, local rank `MPI_LOCALRANKID`
//!    (0 when absent: Hydra does not always set it);
//! 3. SLURM's `srun`: `SLURM_PROCID`, `SLURM_STEP_NUM_TASKS` (else `SLURM_NTASKS`), `SLURM_LOCALID`;
//! 4. torchrun-style: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`.
//!
//! None of them: a single process. A family given only in part, a value that is not a number,
//! or a rank outside the world is an error naming the variables, never a silent single process
//! (which would train N copies of the same run side by side).

use anyhow::{bail, Result};
use std::fmt;

/// The launcher that started this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launcher {
    /// No launcher variables: one process.
    Single,
    OpenMpi,
    /// MPICH or Intel MPI through Hydra's PMI.
    Pmi,
    Slurm,
    Torchrun,
}

impl fmt::Display for Launcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Launcher::Single => "a single process",
            Launcher::OpenMpi => "Open MPI",
            Launcher::Pmi => "MPICH/PMI",
            Launcher::Slurm => "SLURM srun",
            Launcher::Torchrun => "torchrun-style RANK/WORLD_SIZE",
        })
    }
}

/// This process's place in the job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    pub launcher: Launcher,
    /// 0-based, unique in the job; rank 0 writes logs and checkpoints.
    pub rank: usize,
    pub world_size: usize,
    /// 0-based among the processes of this node: the GPU this rank opens.
    pub local_rank: usize,
}

impl Launch {
    pub fn single() -> Launch {
        Launch { launcher: Launcher::Single, rank: 0, world_size: 1, local_rank: 0 }
    }

    /// Rank 0: the one that logs, prints progress and writes checkpoints.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// From this process's environment.
    pub fn from_env() -> Result<Launch> {
        Launch::from_vars(|name| std::env::var(name).ok())
    }

    /// From any variable lookup (the environment, or a table in tests).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Launch> {
        // (launcher, rank var, size vars in preference order, local rank var, local rank optional)
        struct Family {
            launcher: Launcher,
            rank: &'static str,
            size: &'static [&'static str],
            local: &'static str,
            local_optional: bool,
        }
        const FAMILIES: [Family; 4] = [
            Family {
                launcher: Launcher::OpenMpi,
                rank: "OMPI_COMM_WORLD_RANK",
                size: &["OMPI_COMM_WORLD_SIZE"],
                local: "OMPI_COMM_WORLD_LOCAL_RANK",
                local_optional: false,
            },
            Family {
                launcher: Launcher::Pmi,
                rank: "PMI_RANK",
                size: &["PMI_SIZE"],
                local: "MPI_LOCALRANKID",
                local_optional: true,
            },
            Family {
                launcher: Launcher::Slurm,
                rank: "SLURM_PROCID",
                size: &["SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"],
                local: "SLURM_LOCALID",
                local_optional: false,
            },
            Family {
                launcher: Launcher::Torchrun,
                rank: "RANK",
                size: &["WORLD_SIZE"],
                local: "LOCAL_RANK",
                local_optional: false,
            },
        ];
        for family in &FAMILIES {
            let rank = get(family.rank);
            let size = family.size.iter().find_map(|&name| get(name).map(|v| (name, v)));
            let local = get(family.local);
            // SLURM sets SLURM_NTASKS in a batch script that srun did not start; only the rank
            // marks a process srun launched, so it alone decides that SLURM is present.
            let present = match family.launcher {
                Launcher::Slurm => rank.is_some(),
                _ => rank.is_some() || size.is_some() || local.is_some(),
            };
            if !present {
                continue;
            }
            let mut missing = Vec::new();
            if rank.is_none() {
                missing.push(family.rank.to_string());
            }
            if size.is_none() {
                missing.push(family.size.join(" or "));
            }
            if local.is_none() && !family.local_optional {
                missing.push(family.local.to_string());
            }
            if !missing.is_empty() {
                bail!(
                    "the {} launcher variables are incomplete: {} missing (set all of {}, {} and {}, or none)",
                    family.launcher,
                    missing.join(", "),
                    family.rank,
                    family.size.join("/"),
                    family.local
                );
            }
            let (size_name, size) = size.expect("checked above");
            let rank = parse(family.rank, rank.as_deref().expect("checked above"))?;
            let world_size = parse(size_name, &size)?;
            let local_rank = match &local {
                Some(v) => parse(family.local, v)?,
                None => 0,
            };
            if world_size == 0 {
                bail!("{size_name}=0: the world size must be at least 1");
            }
            if rank >= world_size {
                bail!("{}={rank} is not below {size_name}={world_size}", family.rank);
            }
            if local_rank >= world_size {
                bail!("{}={local_rank} is not below {size_name}={world_size}", family.local);
            }
            return Ok(Launch { launcher: family.launcher, rank, world_size, local_rank });
        }
        Ok(Launch::single())
    }
}

fn parse(name: &str, value: &str) -> Result<usize> {
    match value.trim().parse::<usize>() {
        Ok(n) => Ok(n),
        Err(_) => bail!("{name}={value:?} is not a non-negative integer"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn launch(vars: &[(&str, &str)]) -> Result<Launch> {
        let table: HashMap<String, String> =
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Launch::from_vars(|name| table.get(name).cloned())
    }

    #[test]
    fn no_variables_is_one_process() {
        assert_eq!(launch(&[]).unwrap(), Launch::single());
        // A SLURM batch script that srun did not start is one process too.
        assert_eq!(launch(&[("SLURM_NTASKS", "8"), ("SLURM_JOB_ID", "7")]).unwrap(), Launch::single());
    }

    #[test]
    fn each_launcher_is_read() {
        let l = launch(&[
            ("OMPI_COMM_WORLD_RANK", "3"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
        ])
        .unwrap();
        assert_eq!(l, Launch { launcher: Launcher::OpenMpi, rank: 3, world_size: 4, local_rank: 1 });
        assert!(!l.is_main());
        let l = launch(&[("PMI_RANK", "0"), ("PMI_SIZE", "2")]).unwrap();
        assert_eq!(l, Launch { launcher: Launcher::Pmi, rank: 0, world_size: 2, local_rank: 0 });
        assert!(l.is_main());
        let l = launch(&[("SLURM_PROCID", "5"), ("SLURM_NTASKS", "16"), ("SLURM_LOCALID", "5")]).unwrap();
        assert_eq!(l, Launch { launcher: Launcher::Slurm, rank: 5, world_size: 16, local_rank: 5 });
        // The step's own task count wins over the allocation's.
        let l = launch(&[
            ("SLURM_PROCID", "1"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_STEP_NUM_TASKS", "2"),
            ("SLURM_LOCALID", "1"),
        ])
        .unwrap();
        assert_eq!(l.world_size, 2);
        let l = launch(&[("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")]).unwrap();
        assert_eq!(l, Launch { launcher: Launcher::Torchrun, rank: 1, world_size: 2, local_rank: 0 });
    }

    #[test]
    fn mpirun_inside_a_slurm_allocation_is_open_mpi() {
        let l = launch(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "1"),
            ("SLURM_LOCALID", "0"),
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
        ])
        .unwrap();
        assert_eq!(l.launcher, Launcher::OpenMpi);
        assert_eq!((l.rank, l.world_size), (1, 2));
    }

    #[test]
    fn partial_or_inconsistent_variables_are_errors() {
        let e = launch(&[("RANK", "1"), ("WORLD_SIZE", "2")]).unwrap_err().to_string();
        assert!(e.contains("LOCAL_RANK missing"), "{e}");
        let e = launch(&[("OMPI_COMM_WORLD_SIZE", "2")]).unwrap_err().to_string();
        assert!(e.contains("OMPI_COMM_WORLD_RANK") && e.contains("OMPI_COMM_WORLD_LOCAL_RANK"), "{e}");
        let e = launch(&[("SLURM_PROCID", "0"), ("SLURM_LOCALID", "0")]).unwrap_err().to_string();
        assert!(e.contains("SLURM_STEP_NUM_TASKS or SLURM_NTASKS missing"), "{e}");
        let e = launch(&[("PMI_RANK", "2"), ("PMI_SIZE", "2")]).unwrap_err().to_string();
        assert!(e.contains("PMI_RANK=2 is not below PMI_SIZE=2"), "{e}");
        let e = launch(&[("RANK", "0"), ("WORLD_SIZE", "0"), ("LOCAL_RANK", "0")]).unwrap_err().to_string();
        assert!(e.contains("WORLD_SIZE=0"), "{e}");
        let e = launch(&[("RANK", "one"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")]).unwrap_err().to_string();
        assert!(e.contains("RANK=\"one\" is not a non-negative integer"), "{e}");
        let e = launch(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "2")]).unwrap_err().to_string();
        assert!(e.contains("LOCAL_RANK=2 is not below WORLD_SIZE=2"), "{e}");
    }
}
