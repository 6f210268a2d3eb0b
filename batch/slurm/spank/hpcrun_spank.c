/*
 * hpcrun_spank.c - run each Slurm task inside an hpcrun image:
 *
 *     srun --hpcrun-image=IMAGE [--hpcrun-options="--bind /a:/b"] [--hpcrun-run] CMD ARGS...
 *
 * becomes, for every task of the step, `hpcrun exec [OPTIONS] -- IMAGE CMD ARGS...`
 * (`hpcrun run` with --hpcrun-run). Without --hpcrun-image the plugin does nothing.
 *
 * Why it is safe: all the work happens in slurm_spank_task_init, which Slurm calls in
 * the task process after it has dropped to the user's uid/gids, just before it would
 * exec the command. We exec hpcrun instead, with the task's own argv and environment,
 * so nothing here has more privilege than the user running the command by hand.
 * The one exception, `warm` below, runs as root in slurmstepd only to fork, join the
 * extern step's cgroups and drop to the user for good, before it runs anything.
 *
 * With `warm` in plugstack.conf, slurm_spank_task_post_fork of every job's extern step
 * (PrologFlags=contain) starts one *job keeper* per node, as the user, in the extern
 * step's cgroup: a small loop that, asked by a task of the job over a socket in the
 * user's private /dev/shm/hpcrun-UID, starts that task's share keeper (`hpcrun` again,
 * with the task's argv, environment and working directory) as its own child. Keepers
 * then live in the extern step: no step's end kills them, the job's end does (SIGTERM,
 * on which every one removes its files, then SIGKILL) on every node.
 *
 * plugstack.conf:  optional /usr/local/lib/hpcrun/hpcrun_spank.so hpcrun=/opt/hpcrun-venv/bin/hpcrun [warm]
 */
#define _GNU_SOURCE   /* environ */
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <slurm/slurm.h>   /* SLURM_MAX_NORMAL_STEP_ID */
#include <slurm/spank.h>

SPANK_PLUGIN(hpcrun, 1);

#define DEFAULT_HPCRUN "/opt/hpcrun-venv/bin/hpcrun"

static char hpcrun_bin[4096] = DEFAULT_HPCRUN;

enum { OPT_IMAGE = 1, OPT_OPTIONS, OPT_RUN };
static int warm;   /* plugstack.conf's `warm`: a job keeper on every node of every job */

/* Callbacks run on the srun/sbatch side (remote=0) and again in slurmstepd (remote=1);
 * the values travel with the job through Slurm's own option forwarding, and the task
 * side reads them with spank_option_getopt, so only local sanity checks happen here. */
static int opt_cb(int val, const char *optarg, int remote)
{
    /* An empty image is refused; Slurm prints "Invalid --hpcrun-image argument". */
    return (!remote && val == OPT_IMAGE && !(optarg && *optarg)) ? -1 : 0;
}

static struct spank_option opts[] = {
    {"hpcrun-image", "IMAGE", "Run each task inside IMAGE with hpcrun (exec CMD in it).",
     1, OPT_IMAGE, opt_cb},
    {"hpcrun-options", "\"OPTS\"", "Extra `hpcrun exec` options, whitespace-separated "
     "(e.g. \"--bind /data --env A=1\"); no quoting.", 1, OPT_OPTIONS, opt_cb},
    {"hpcrun-run", NULL, "With --hpcrun-image: run the image's runscript with the "
     "command line as its arguments.", 0, OPT_RUN, opt_cb},
    SPANK_OPTIONS_TABLE_END
};

int slurm_spank_init(spank_t sp, int ac, char **av)
{
    spank_context_t ctx = spank_context();
    int i;

    if (ctx != S_CTX_LOCAL && ctx != S_CTX_REMOTE && ctx != S_CTX_ALLOCATOR)
        return 0;
    for (i = 0; i < ac; i++) {
        if (strncmp(av[i], "hpcrun=", 7) == 0 && av[i][7] == '/') {
            snprintf(hpcrun_bin, sizeof hpcrun_bin, "%s", av[i] + 7);
        } else if (strcmp(av[i], "warm") == 0) {
            warm = 1;
        } else {
            /* A typo in plugstack.conf must not break every srun: log and go on. */
            slurm_error("hpcrun: ignoring plugstack.conf argument '%s' (want hpcrun=/abs/path or warm)", av[i]);
        }
    }
    for (i = 0; opts[i].name; i++)
        if (spank_option_register(sp, &opts[i]) != ESPANK_SUCCESS)
            slurm_error("hpcrun: cannot register --%s", opts[i].name);
    return 0;
}

static int given(spank_t sp, int idx, char **arg)
{
    char *dummy = NULL;
    return spank_option_getopt(sp, &opts[idx], arg ? arg : &dummy) == ESPANK_SUCCESS;
}

/* slurmstepd applies the rlimits srun propagated (SLURM_RLIMIT_*) only after
 * task_init, and we never return there, so apply them here the same way: the soft
 * limit, capped by the hard one (an unprivileged process cannot raise that). */
static void apply_rlimits(spank_t sp)
{
    static const struct { const char *name; int res; } lim[] = {
        {"CPU", RLIMIT_CPU}, {"FSIZE", RLIMIT_FSIZE}, {"DATA", RLIMIT_DATA},
        {"STACK", RLIMIT_STACK}, {"CORE", RLIMIT_CORE}, {"RSS", RLIMIT_RSS},
        {"NPROC", RLIMIT_NPROC}, {"NOFILE", RLIMIT_NOFILE}, {"MEMLOCK", RLIMIT_MEMLOCK},
        {"AS", RLIMIT_AS},
    };
    char var[64], val[64];
    size_t i;

    for (i = 0; i < sizeof lim / sizeof lim[0]; i++) {
        struct rlimit r;
        char *p, *end;
        unsigned long long v;

        snprintf(var, sizeof var, "SLURM_RLIMIT_%s", lim[i].name);
        if (spank_getenv(sp, var, val, sizeof val) != ESPANK_SUCCESS)
            continue;
        spank_unsetenv(sp, var);
        p = val[0] == 'U' ? val + 1 : val;   /* 'U': set explicitly by the user */
        errno = 0;
        v = strtoull(p, &end, 10);
        if (errno || end == p || getrlimit(lim[i].res, &r) != 0)
            continue;
        r.rlim_cur = (v == (unsigned long long) RLIM_INFINITY || v > r.rlim_max) ? r.rlim_max : v;
        setrlimit(lim[i].res, &r);
    }
}

/* Remote context, in the task process, as the user. Does not return when wrapping. */
int slurm_spank_task_init(spank_t sp, int ac, char **av)
{
    char *image = NULL, *extra = NULL, *copy = NULL, *tok, *save;
    char **targv = NULL, **env = NULL, **argv;
    char bin[4096], tmpdir[8];
    uint32_t stepid = 0;
    int targc = 0, n = 0, i;

    if (!spank_remote(sp))
        return 0;
    if (!given(sp, 0, &image)) {
        /* Checked here, not in srun: errors of an `optional` plugin's init_post_opt
         * are ignored there, and the order of the options is not known to a callback. */
        if (given(sp, 1, NULL) || given(sp, 2, NULL)) {
            fprintf(stderr, "hpcrun (spank): --hpcrun-options and --hpcrun-run need --hpcrun-image=IMAGE\n");
            _exit(2);
        }
        return 0;   /* no --hpcrun-image: leave the task alone */
    }
    /* The batch script and salloc's interactive step stay on the host (they call srun,
     * which is not in the image); with #SBATCH --hpcrun-image every srun step of the
     * job inherits the option and runs in the image. */
    if (spank_get_item(sp, S_JOB_STEPID, &stepid) != ESPANK_SUCCESS ||
        stepid >= SLURM_MAX_NORMAL_STEP_ID)
        return 0;
    if (spank_get_item(sp, S_JOB_ARGV, &targc, &targv) != ESPANK_SUCCESS || targc < 1) {
        fprintf(stderr, "hpcrun (spank): no command for the task\n");
        _exit(2);
    }
    given(sp, 1, &extra);

    /* HPCRUN_SPANK_BIN in the job environment overrides plugstack's hpcrun=: we are
     * already the user, who could run any binary anyway, so this grants nothing. */
    snprintf(bin, sizeof bin, "%s", hpcrun_bin);
    {
        char over[4096];
        if (spank_getenv(sp, "HPCRUN_SPANK_BIN", over, sizeof over) == ESPANK_SUCCESS && over[0])
            snprintf(bin, sizeof bin, "%s", over);
    }
    if (bin[0] != '/') {
        fprintf(stderr, "hpcrun (spank): HPCRUN_SPANK_BIN must be an absolute path, not '%s'\n", bin);
        _exit(127);
    }
    if (access(bin, X_OK) != 0) {
        fprintf(stderr, "hpcrun (spank): cannot run %s: %s (set hpcrun= in plugstack.conf "
                "or HPCRUN_SPANK_BIN)\n", bin, strerror(errno));
        _exit(127);
    }

    apply_rlimits(sp);
    /* slurmstepd also sets TMPDIR after task_init; keep the same default. */
    if (spank_getenv(sp, "TMPDIR", tmpdir, sizeof tmpdir) == ESPANK_ENV_NOEXIST)
        spank_setenv(sp, "TMPDIR", "/tmp", 1);
    if (spank_get_item(sp, S_JOB_ENV, &env) != ESPANK_SUCCESS)
        env = NULL;

    /* hpcrun exec|run [extra...] -- IMAGE ARGV...  ("--" so an image or command that
     * starts with '-' is never read as an option). */
    if (extra)
        copy = strdup(extra);
    argv = calloc(targc + 6 + (copy ? strlen(copy) / 2 + 1 : 0), sizeof *argv);
    if (!argv || (extra && !copy)) {
        fprintf(stderr, "hpcrun (spank): out of memory\n");
        _exit(1);
    }
    argv[n++] = bin;
    argv[n++] = given(sp, 2, NULL) ? "run" : "exec";
    for (tok = copy ? strtok_r(copy, " \t\n", &save) : NULL; tok; tok = strtok_r(NULL, " \t\n", &save))
        argv[n++] = tok;
    argv[n++] = "--";
    argv[n++] = image;
    for (i = 0; i < targc; i++)
        argv[n++] = targv[i];
    argv[n] = NULL;

    fflush(NULL);
    execve(bin, argv, env ? env : environ);
    fprintf(stderr, "hpcrun (spank): cannot run %s: %s\n", bin, strerror(errno));
    _exit(127);
}

/* ---- the job keeper (`warm`) ---------------------------------------------- */

static volatile sig_atomic_t job_end;

static void on_term(int sig) { job_end = 1; }

/* What the forked job keeper needs, found before the fork: slurmstepd has threads, so
 * the child keeps to system calls (no malloc, no NSS) until it has dropped to the user. */
struct who {
    uid_t uid;
    gid_t gid, groups[256];
    int ngroups, nprocs, frozen;
    uint32_t jobid;
    char procs[16][512];   /* the extern step's cgroup.procs files to join */
};

/* The extern step's cgroups, which Slurm kills at the job's end (cgroup v1: slurmstepd
 * sits in .../job_ID or already in .../job_ID/step_extern). The freezer one, which
 * proctrack/cgroup signals, must be among them (or slurmstepd there already). */
static void extern_cgroups(struct who *w)
{
    char line[1024], suffix[64];
    FILE *f = fopen("/proc/self/cgroup", "r");

    if (!f)
        return;
    snprintf(suffix, sizeof suffix, "/job_%u", w->jobid);
    while (fgets(line, sizeof line, f) && w->nprocs < 16) {
        char *ctrl = strchr(line, ':'), *cg, *end;
        size_t n;
        if (!ctrl || !(cg = strchr(++ctrl, ':')))
            continue;
        *cg++ = '\0';
        if ((end = strchr(cg, '\n')))
            *end = '\0';
        n = strlen(cg);
        if (strcmp(ctrl, "freezer") == 0 && strstr(cg, suffix) && strstr(cg, "/step_extern"))
            w->frozen = 1;   /* slurmstepd is there already */
        if (!*ctrl || strncmp(ctrl, "name=", 5) == 0 ||
            n < strlen(suffix) || strcmp(cg + n - strlen(suffix), suffix) != 0)
            continue;   /* in step_extern already, or not a job's cgroup */
        if (snprintf(w->procs[w->nprocs], sizeof w->procs[0], "/sys/fs/cgroup/%s%s/step_extern/cgroup.procs",
                     ctrl, cg) >= (int) sizeof w->procs[0])
            continue;
        if (strcmp(ctrl, "freezer") == 0)
            w->frozen = 2 + w->nprocs;   /* must work */
        w->nprocs++;
    }
    fclose(f);
}

/* In the child, as root: join the extern step, then become the user for good. */
static int become_user(const struct who *w)
{
    char pid[24];
    int i, len = snprintf(pid, sizeof pid, "%d\n", (int) getpid());

    for (i = 0; i < w->nprocs; i++) {
        int fd = open(w->procs[i], O_WRONLY | O_CLOEXEC);
        int ok = fd >= 0 && write(fd, pid, len) == len;
        if (fd >= 0)
            close(fd);
        if (!ok && w->frozen == 2 + i)
            return -1;
    }
    if (!w->frozen || setgroups(w->ngroups, w->groups) != 0 || setgid(w->gid) != 0 ||
        setuid(w->uid) != 0 || getuid() != w->uid || geteuid() != w->uid || getgid() != w->gid ||
        getegid() != w->gid || setuid(0) == 0)
        return -1;
    return prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
}

/* One request: "ARGV0\0ARG1\0...\0\0ENV1\0ENV2\0..." plus the task's working directory's
 * fd. The child runs argv (absolute) there with that environment and
 * HPCRUN_JOB_SPAWN=FD, FD being the connection, on which it answers the task. */
static void spawn(int conn, uid_t uid)
{
    static char buf[1 << 18];
    char cbuf[CMSG_SPACE(sizeof(int))], fdvar[48];
    char *argv[4096], *envp[4096];
    struct iovec iov = {buf, sizeof buf - 2};
    struct msghdr msg = {0};
    struct cmsghdr *c;
    struct ucred cred;
    socklen_t len = sizeof cred;
    int cwd = -1, na = 0, ne = 0, i;
    ssize_t got;
    char *p, *end;

    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf;
    msg.msg_controllen = sizeof cbuf;
    struct timeval slow = {10, 0};   /* one connection at a time: a silent one must not stop us */

    if (getsockopt(conn, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 || cred.uid != uid ||
        setsockopt(conn, SOL_SOCKET, SO_RCVTIMEO, &slow, sizeof slow) != 0)
        return;
    got = recvmsg(conn, &msg, MSG_CMSG_CLOEXEC);
    for (c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
            memcpy(&cwd, CMSG_DATA(c), sizeof cwd);
    if (got <= 0 || cwd < 0 || (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)))
        goto out;
    buf[got] = buf[got + 1] = '\0';
    for (p = buf, end = buf + got; p < end && *p && na < 4095; p += strlen(p) + 1)
        argv[na++] = p;
    for (p++; p < end && *p && ne < 4094; p += strlen(p) + 1)
        envp[ne++] = p;
    argv[na] = NULL;
    snprintf(fdvar, sizeof fdvar, "HPCRUN_JOB_SPAWN=%d", conn);
    envp[ne++] = fdvar;
    envp[ne] = NULL;
    if (na < 1 || argv[0][0] != '/')
        goto out;
    if (fork() == 0) {
        sigset_t none;
        for (i = 1; i < NSIG; i++)
            signal(i, SIG_DFL);   /* SIGCHLD ignored here would survive exec */
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        if (fchdir(cwd) == 0 && fcntl(conn, F_SETFD, 0) == 0)
            execve(argv[0], argv, envp);
        dprintf(conn, "127 hpcrun (spank): the job keeper cannot run %s: %s", argv[0], strerror(errno));
        _exit(127);
    }
out:
    if (cwd >= 0)
        close(cwd);
}

/* As the user, in the extern step: serve until Slurm's SIGTERM at the job's end, then
 * remove the socket (and the directory when empty). ready: closed once we listen. */
static void job_keeper(const struct who *w, int ready)
{
    uid_t uid = w->uid;
    uint32_t jobid = w->jobid;
    char dir[64], name[64];
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    struct sigaction term = {.sa_handler = on_term};
    struct stat st;
    sigset_t none;
    int dfd, lis, fd, null;

    setsid();
    prctl(PR_SET_NAME, "hpcrun-jobkeep", 0, 0, 0);   /* for ps; slurmstepd's name otherwise */
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);   /* slurmstepd's blocked signals, SIGTERM among them */
    null = open("/dev/null", O_RDWR);
    for (fd = 0; fd < 3; fd++)
        dup2(null, fd);
    for (fd = 3; fd < 4096; fd++)
        if (fd != ready)
            close(fd);
    if (become_user(w) != 0)
        _exit(1);
    umask(077);
    /* The user's private directory, never through a link, refused if anyone else's. */
    snprintf(dir, sizeof dir, "/dev/shm/hpcrun-%u", uid);
    if (mkdir(dir, 0700) != 0 && errno != EEXIST)
        _exit(1);
    dfd = open(dir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (dfd < 0 || fstat(dfd, &st) != 0 || st.st_uid != uid || (st.st_mode & 0777) != 0700)
        _exit(1);
    snprintf(name, sizeof name, "job-%u.sock", jobid);
    snprintf(sa.sun_path, sizeof sa.sun_path, "/proc/self/fd/%d/%s", dfd, name);
    unlinkat(dfd, name, 0);   /* a killed job keeper's of an earlier allocation */
    lis = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (lis < 0 || bind(lis, (struct sockaddr *) &sa, sizeof sa) != 0 || listen(lis, 64) != 0)
        _exit(1);
    sigaction(SIGTERM, &term, NULL);   /* no SA_RESTART: accept returns EINTR */
    signal(SIGCHLD, SIG_IGN);          /* the spawned hpcrun processes reap themselves */
    signal(SIGPIPE, SIG_IGN);
    signal(SIGHUP, SIG_IGN);
    signal(SIGINT, SIG_IGN);
    close(ready);
    while (!job_end) {
        int conn = accept4(lis, NULL, NULL, SOCK_CLOEXEC);
        if (conn < 0)
            continue;
        spawn(conn, uid);
        close(conn);
    }
    unlinkat(dfd, name, 0);
    rmdir(dir);   /* ours (0700): fails while anything is left in it */
    _exit(0);
}

/* Remote context, in slurmstepd as root, after it forked the extern step's task. */
int slurm_spank_task_post_fork(spank_t sp, int ac, char **av)
{
    static struct who w;
    uint32_t stepid = 0;
    gid_t *gids = NULL;
    int pipefd[2], status, n = 0;
    pid_t pid;
    char c;

    if (!spank_remote(sp) || spank_get_item(sp, S_JOB_STEPID, &stepid) != ESPANK_SUCCESS ||
        stepid != SLURM_EXTERN_CONT || !warm)
        return 0;
    memset(&w, 0, sizeof w);
    if (spank_get_item(sp, S_JOB_ID, &w.jobid) != ESPANK_SUCCESS ||
        spank_get_item(sp, S_JOB_UID, &w.uid) != ESPANK_SUCCESS ||
        spank_get_item(sp, S_JOB_GID, &w.gid) != ESPANK_SUCCESS || w.uid == 0)
        return 0;   /* never root's: the job keeper runs what tasks ask */
    if (spank_get_item(sp, S_JOB_SUPPLEMENTARY_GIDS, &gids, &n) == ESPANK_SUCCESS && gids)
        for (; w.ngroups < n && w.ngroups < 256; w.ngroups++)
            w.groups[w.ngroups] = gids[w.ngroups];
    extern_cgroups(&w);
    if (!w.frozen) {
        slurm_error("hpcrun: no cgroup v1 freezer job cgroup: no job keeper (warm)");
        return 0;
    }
    if (pipe2(pipefd, O_CLOEXEC) != 0)
        return 0;
    pid = fork();
    if (pid == 0) {
        if (fork() == 0)
            job_keeper(&w, pipefd[1]);   /* reparented: not slurmstepd's child */
        _exit(0);
    }
    close(pipefd[1]);
    if (pid > 0)
        waitpid(pid, &status, 0);
    /* Until it listens (or died): the job's first step must find it. */
    while (pid > 0 && read(pipefd[0], &c, 1) < 0 && errno == EINTR)
        ;
    close(pipefd[0]);
    if (pid < 0)
        slurm_error("hpcrun: cannot start the job keeper: %s", strerror(errno));
    return 0;
}
