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
 *
 * plugstack.conf:  optional /usr/local/lib/hpcrun/hpcrun_spank.so hpcrun=/opt/hpcrun-venv/bin/hpcrun
 */
#define _GNU_SOURCE   /* environ */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include <slurm/slurm.h>   /* SLURM_MAX_NORMAL_STEP_ID */
#include <slurm/spank.h>

SPANK_PLUGIN(hpcrun, 1);

#define DEFAULT_HPCRUN "/opt/hpcrun-venv/bin/hpcrun"

static char hpcrun_bin[4096] = DEFAULT_HPCRUN;

enum { OPT_IMAGE = 1, OPT_OPTIONS, OPT_RUN };

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
        } else {
            /* A typo in plugstack.conf must not break every srun: log and go on. */
            slurm_error("hpcrun: ignoring plugstack.conf argument '%s' (want hpcrun=/abs/path)", av[i]);
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
