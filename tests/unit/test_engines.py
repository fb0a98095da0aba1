"""Which engine started distrnn (launcher/engines.py): each engine knows its own variables and no other's, the
order settles the environments where several engines' variables meet, and `distrnn train` takes what it says."""

from __future__ import annotations

import pytest

from distrnn.launcher import engines, processes
from distrnn.launcher.engines import PlainCommand, PyTorchJob, Ray, Slurm, Torchrun, TrainJob

# What each engine sets, as a process under it sees it.
TRAINJOB_POD = {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "auto", "PET_NODE_RANK": "1",
                "PET_MASTER_ADDR": "distrnn-node-0-0.distrnn", "PET_MASTER_PORT": "29400"}
PYTORCHJOB_POD = {"MASTER_ADDR": "distrnn-master-0", "MASTER_PORT": "23456", "WORLD_SIZE": "3", "RANK": "2",
                  "PYTHONUNBUFFERED": "0"}
SLURM_JOB = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_NTASKS": "2"}
RAY_DRIVER = {"RAY_ADDRESS": "10.0.0.1:6379"}
TORCHRUN_WORKER = {"TORCHELASTIC_RUN_ID": "none", "RANK": "3", "WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": "29500", "LOCAL_RANK": "1", "GROUP_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
OWN = {TrainJob: TRAINJOB_POD, PyTorchJob: PYTORCHJOB_POD, Slurm: SLURM_JOB, Ray: RAY_DRIVER,
       Torchrun: TORCHRUN_WORKER}


@pytest.mark.parametrize("engine", OWN, ids=lambda e: e.__name__)
@pytest.mark.parametrize("env_of", OWN, ids=lambda e: f"under-{e.__name__}")
def test_each_engine_detects_its_own_variables_and_no_others(engine, env_of):
    assert engine.detect(OWN[env_of]) == (engine is env_of)
    assert not engine.detect({})


@pytest.mark.parametrize("engine", OWN, ids=lambda e: e.__name__)
def test_under_each_engine_alone_detect_names_it(engine):
    assert type(engines.detect(OWN[engine])) is engine


def test_a_plain_command_is_what_is_left():
    assert all(PlainCommand.detect(env) for env in [{}, *OWN.values()])
    assert engines.ORDER[-1] is PlainCommand
    assert engines.detect({"HOME": "/root"}).describe() == "none (a plain command)"


def test_a_pytorchjob_pod_that_runs_torchrun_is_torchrun_in_its_workers():
    """torchrun overwrites the pod's four names with its own (processes, not pods) and adds TORCHELASTIC_RUN_ID:
    PyTorchJob says no there, so the order reaches Torchrun, which takes no machine count from them."""
    worker = {**PYTORCHJOB_POD, **TORCHRUN_WORKER}
    assert not PyTorchJob.detect(worker) and Torchrun.detect(worker)
    engine = engines.detect(worker)
    assert type(engine) is Torchrun
    assert (engine.machines, engine.rank, engine.address, engine.port, engine.processes) == (None,) * 5
    assert type(engines.detect(PYTORCHJOB_POD)) is PyTorchJob  # the pod's own launcher, before torchrun


@pytest.mark.parametrize("env, expected", [
    ({**TRAINJOB_POD, **TORCHRUN_WORKER}, TrainJob),  # a TrainJob's torchrun worker: PET_* come first
    ({**TRAINJOB_POD, **PYTORCHJOB_POD}, TrainJob),
    ({**SLURM_JOB, **TORCHRUN_WORKER}, Slurm),  # torchrun inside a SLURM job
    ({**SLURM_JOB, **RAY_DRIVER}, Slurm),  # a Ray cluster inside a SLURM job
    ({**RAY_DRIVER, **TORCHRUN_WORKER}, Ray),
    ({**PYTORCHJOB_POD, **SLURM_JOB}, PyTorchJob),
], ids=["trainjob+torchrun", "trainjob+pytorchjob", "slurm+torchrun", "slurm+ray", "ray+torchrun", "pytorchjob+slurm"])
def test_where_engines_meet_the_first_in_order_is_named(env, expected):
    assert type(engines.detect(env)) is expected
    assert [kind for kind in engines.ORDER if kind.detect(env)][0] is expected


def test_what_each_engine_says():
    trainjob = engines.detect(TRAINJOB_POD)
    assert (trainjob.machines, trainjob.rank, trainjob.address, trainjob.port, trainjob.processes) == (
        2, 1, "distrnn-node-0-0.distrnn", 29400, None)  # PET_NPROC_PER_NODE=auto: distrnn's choice
    assert engines.detect({**TRAINJOB_POD, "PET_NPROC_PER_NODE": "4"}).processes == 4
    # what `distrnn env` prints (docs/running.md quotes this line)
    assert trainjob.describe() == ("Kubeflow Trainer (TrainJob) (PET_NNODES=2, PET_NPROC_PER_NODE=auto, "
                                   "PET_NODE_RANK=1, PET_MASTER_ADDR=distrnn-node-0-0.distrnn, PET_MASTER_PORT=29400)")
    job = engines.detect(PYTORCHJOB_POD)
    assert (job.machines, job.rank, job.address, job.port, job.processes) == (3, 2, "distrnn-master-0", 23456, None)
    assert job.describe() == ("Kubeflow PyTorchJob (MASTER_ADDR=distrnn-master-0, MASTER_PORT=23456, WORLD_SIZE=3, "
                              "RANK=2)")
    for env in SLURM_JOB, RAY_DRIVER, TORCHRUN_WORKER:  # shown, not taken
        engine = engines.detect(env)
        assert (engine.machines, engine.rank, engine.address, engine.port, engine.processes) == (None,) * 5
    assert engines.detect(SLURM_JOB).describe() == "SLURM (SLURM_JOB_ID=4242, SLURM_JOB_NUM_NODES=2, SLURM_NODEID=1)"
    assert engines.detect(RAY_DRIVER).describe() == "Ray (RAY_ADDRESS=10.0.0.1:6379)"
    assert engines.detect(TORCHRUN_WORKER).describe() == ("torchrun (TORCHELASTIC_RUN_ID=none, RANK=3, WORLD_SIZE=4, "
                                                          "MASTER_ADDR=127.0.0.1, MASTER_PORT=29500)")


def test_a_malformed_number_fails_when_the_engine_is_detected():
    with pytest.raises(ValueError):
        engines.detect({**TRAINJOB_POD, "PET_MASTER_PORT": "http"})


@pytest.fixture
def environ(monkeypatch):
    """os.environ without any engine's variables; the function it gives puts some in."""
    for name in {n for env in OWN.values() for n in env}:
        monkeypatch.delenv(name, raising=False)

    def put(env: dict[str, str]) -> None:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
    return put


def test_train_takes_the_machine_flags_the_command_line_leaves_out(environ):
    environ({**TRAINJOB_POD, "PET_NPROC_PER_NODE": "3"})
    p = processes.plan_training("cpu", None, None, None, None, None)
    assert (p.num_processes, p.launch_config.name) == (3, "multinode.yaml")
    assert p.machines == processes.Machines(2, 1, "distrnn-node-0-0.distrnn", 29400)
    p = processes.plan_training("cpu", 1, 3, 2, "10.0.0.9", 29999)  # a flag given on the command line wins
    assert (p.num_processes, p.machines) == (1, processes.Machines(3, 2, "10.0.0.9", 29999))


def test_train_under_a_pytorchjob_and_under_torchrun(environ):
    environ(PYTORCHJOB_POD)
    p = processes.plan_training("cpu", None, None, None, None, None)
    assert (p.num_processes, p.machines) == (1, processes.Machines(3, 2, "distrnn-master-0", 23456))
    environ(TORCHRUN_WORKER)  # the pod runs torchrun: its WORLD_SIZE counts processes, and is not taken
    p = processes.plan_training("cpu", None, None, None, None, None)
    assert (p.num_processes, p.machines, p.launch_config.name) == (1, None, "cpu.yaml")
