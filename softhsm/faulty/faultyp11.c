/* faultyp11: a PKCS#11 module that forwards every call to a real module
 * (SoftHSM by default) and injects real faults, driven by a control file.
 *
 * Environment (read once, when the module is loaded):
 *   FAULTY_P11_REAL     the real module (default /usr/lib/softhsm/libsofthsm2.so)
 *   FAULTY_P11_CONTROL  the control file (optional; re-read when its mtime/size/inode changes)
 *   FAULTY_P11_LOG      call log, one line per call: "<time> <function> <rv>[ query| injected]",
 *                       time in seconds of CLOCK_MONOTONIC (Python's time.monotonic() on Linux)
 *
 * Control file: "key=value" lines, '#' starts a comment.
 *   present=0|1        0: the token is out of its reader (all slots). Slot list with
 *                      tokenPresent=TRUE is empty, CKF_TOKEN_PRESENT is cleared, token
 *                      calls give CKR_TOKEN_NOT_PRESENT, session calls CKR_DEVICE_REMOVED.
 *                      On removal the real sessions are closed (which also logs out), so
 *                      old handles stay dead after re-insertion (CKR_SESSION_HANDLE_INVALID).
 *                      Each change is a slot event for C_WaitForSlotEvent.
 *   serial=XXXX        C_GetTokenInfo reports this serial number (a "different token").
 *   latency_ms=N       C_Sign / C_Decrypt sleep N ms before producing output (a slow card).
 *   pin_retries=N      keep a user PIN retry counter with N tries left (see w_C_Login); a good
 *                      PIN restores pin_max (default: 3, or N if larger). Fewer than pin_max
 *                      left counts as earlier failures (CKF_USER_PIN_COUNT_LOW). An empty
 *                      value or no line: no counter, the real flags pass through.
 *   fail=CKR_...       with fail_count=N (default 1): the next N C_Sign / C_Decrypt calls
 *                      that produce output return this error (CKR_DEVICE_ERROR,
 *                      CKR_FUNCTION_FAILED, CKR_GENERAL_ERROR, CKR_DEVICE_MEMORY or a number).
 *   crash_once=PATH    the next C_Sign / C_Decrypt that produces output aborts the whole process
 *                      (a vendor module that crashes), if it can create PATH: one crash in all,
 *                      whichever process gets there first; remove PATH to arm it again.
 *   crash_login_once=PATH  the same for C_Login, after the real call and the retry counter (the PIN
 *                      was tried; the caller never learns the outcome).
 *   pin_arm=, fail_arm=  pin_retries (with pin_max), and fail with fail_count, are applied when
 *                      their value changes; changing pin_arm / fail_arm (any value) re-applies the same one.
 *
 * Build: gcc -shared -fPIC -O2 -I/usr/include/p11-kit-1 faultyp11.c -o faultyp11.so -ldl -lpthread
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <p11-kit/pkcs11.h>

#define EXPORT __attribute__((visibility("default")))
#define MAX_SLOTS 64

static CK_FUNCTION_LIST_PTR real;       /* the real module's table */
static const char *control_path;        /* NULL: no control file */
static int log_fd = -1;
static int initialized;                 /* between C_Initialize and C_Finalize */
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;

/* Control state, guarded by mu. */
static struct {
    struct stat seen;        /* identity of the file last parsed */
    int parsed;              /* 0: never parsed */
    int present;
    char serial[17];         /* "" = the real serial */
    long latency_ms;
    long pin_max, pin_left;  /* pin_max < 0: no counter */
    int pin_failed;          /* a wrong PIN since the last good one */
    CK_RV fail_rv;
    long fail_left;
    char raw_pin[128], raw_fail[128];  /* last values seen, to detect changes */
    char crash_once[256], crash_login_once[256];  /* "" = no crash */
    int event_pending;
    CK_SLOT_ID event_slot;
} st = {.present = 1, .pin_max = -1};

/* ------------------------------------------------------------------ helpers */

static const struct { CK_RV rv; const char *name; } rv_names[] = {
    {CKR_OK, "CKR_OK"}, {CKR_GENERAL_ERROR, "CKR_GENERAL_ERROR"},
    {CKR_FUNCTION_FAILED, "CKR_FUNCTION_FAILED"}, {CKR_ARGUMENTS_BAD, "CKR_ARGUMENTS_BAD"},
    {CKR_NO_EVENT, "CKR_NO_EVENT"}, {CKR_DEVICE_ERROR, "CKR_DEVICE_ERROR"},
    {CKR_DEVICE_MEMORY, "CKR_DEVICE_MEMORY"}, {CKR_DEVICE_REMOVED, "CKR_DEVICE_REMOVED"},
    {CKR_TOKEN_NOT_PRESENT, "CKR_TOKEN_NOT_PRESENT"},
    {CKR_SESSION_HANDLE_INVALID, "CKR_SESSION_HANDLE_INVALID"},
    {CKR_PIN_INCORRECT, "CKR_PIN_INCORRECT"}, {CKR_PIN_LOCKED, "CKR_PIN_LOCKED"},
    {CKR_USER_ALREADY_LOGGED_IN, "CKR_USER_ALREADY_LOGGED_IN"},
    {CKR_USER_NOT_LOGGED_IN, "CKR_USER_NOT_LOGGED_IN"},
    {CKR_BUFFER_TOO_SMALL, "CKR_BUFFER_TOO_SMALL"},
    {CKR_OPERATION_ACTIVE, "CKR_OPERATION_ACTIVE"},
    {CKR_OPERATION_NOT_INITIALIZED, "CKR_OPERATION_NOT_INITIALIZED"},
    {CKR_MECHANISM_INVALID, "CKR_MECHANISM_INVALID"},
    {CKR_FUNCTION_NOT_SUPPORTED, "CKR_FUNCTION_NOT_SUPPORTED"},
    {CKR_CRYPTOKI_NOT_INITIALIZED, "CKR_CRYPTOKI_NOT_INITIALIZED"},
};

/* Append "<time> <name> <rv>[ note]" to the call log: one write(), atomic with O_APPEND. */
static CK_RV logged(const char *name, CK_RV rv, const char *note)
{
    if (log_fd < 0)
        return rv;
    char line[128], num[24];
    const char *rvs = NULL;
    for (size_t i = 0; i < sizeof rv_names / sizeof rv_names[0]; i++)
        if (rv_names[i].rv == rv)
            rvs = rv_names[i].name;
    if (rvs == NULL) {
        snprintf(num, sizeof num, "0x%lx", (unsigned long)rv);
        rvs = num;
    }
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    int n = snprintf(line, sizeof line, "%ld.%06ld %s %s%s%s\n", (long)now.tv_sec, now.tv_nsec / 1000, name,
                     rvs, note ? " " : "", note ? note : "");
    if (n > 0 && write(log_fd, line, (size_t)n) < 0) { /* a test log: nothing to do */ }
    return rv;
}

static CK_RV parse_rv(const char *s)
{
    for (size_t i = 0; i < sizeof rv_names / sizeof rv_names[0]; i++)
        if (strcmp(rv_names[i].name, s) == 0)
            return rv_names[i].rv;
    char *end;
    unsigned long v = strtoul(s, &end, 0);
    return (*s && !*end) ? (CK_RV)v : CKR_DEVICE_ERROR;
}

static void copy(char *dst, size_t size, const char *src)
{
    snprintf(dst, size, "%s", src);
}

/* Removal: close the real sessions of every slot (this logs the token out, as pulling
 * a card does). Called with mu held. */
static void remove_token(void)
{
    CK_SLOT_ID slots[MAX_SLOTS];
    CK_ULONG n = MAX_SLOTS;
    if (!initialized || real->C_GetSlotList(CK_FALSE, slots, &n) != CKR_OK)
        return;
    for (CK_ULONG i = 0; i < n; i++)
        real->C_CloseAllSessions(slots[i]);
    if (n > 0)
        st.event_slot = slots[0];
}

/* Re-read the control file if it changed. Called at the start of every call. */
static void refresh(void)
{
    if (control_path == NULL)
        return;
    struct stat s;
    if (stat(control_path, &s) != 0)
        memset(&s, 0, sizeof s);  /* missing file: same as an empty one */
    pthread_mutex_lock(&mu);
    if (st.parsed && s.st_ino == st.seen.st_ino && s.st_size == st.seen.st_size &&
        s.st_mtim.tv_sec == st.seen.st_mtim.tv_sec && s.st_mtim.tv_nsec == st.seen.st_mtim.tv_nsec) {
        pthread_mutex_unlock(&mu);
        return;
    }
    st.seen = s;
    st.parsed = 1;

    char buf[4096] = "";
    int fd = open(control_path, O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        ssize_t got = read(fd, buf, sizeof buf - 1);
        buf[got > 0 ? got : 0] = '\0';
        close(fd);
    }
    int present = 1;
    char serial[17] = "", pin[32] = "", fail[32] = "", fail_count[32] = "";
    char pin_max[32] = "", pin_arm[32] = "", fail_arm[32] = "", crash_once[256] = "";
    char crash_login_once[256] = "";
    long latency = 0;
    char *save = NULL;
    for (char *line = strtok_r(buf, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        char *hash = strchr(line, '#');
        if (hash)
            *hash = '\0';
        char *eq = strchr(line, '=');
        if (!eq)
            continue;
        *eq = '\0';
        char *key = line, *val = eq + 1;
        while (*key == ' ' || *key == '\t') key++;
        for (char *e = eq - 1; e >= key && (*e == ' ' || *e == '\t'); e--) *e = '\0';
        while (*val == ' ' || *val == '\t') val++;
        for (char *e = val + strlen(val) - 1; e >= val && (*e == ' ' || *e == '\t' || *e == '\r'); e--) *e = '\0';
        if (strcmp(key, "present") == 0) present = atoi(val) != 0;
        else if (strcmp(key, "serial") == 0) copy(serial, sizeof serial, val);
        else if (strcmp(key, "latency_ms") == 0) latency = atol(val);
        else if (strcmp(key, "pin_retries") == 0) copy(pin, sizeof pin, val);
        else if (strcmp(key, "fail") == 0) copy(fail, sizeof fail, val);
        else if (strcmp(key, "fail_count") == 0) copy(fail_count, sizeof fail_count, val);
        else if (strcmp(key, "pin_max") == 0) copy(pin_max, sizeof pin_max, val);
        else if (strcmp(key, "pin_arm") == 0) copy(pin_arm, sizeof pin_arm, val);
        else if (strcmp(key, "fail_arm") == 0) copy(fail_arm, sizeof fail_arm, val);
        else if (strcmp(key, "crash_once") == 0) copy(crash_once, sizeof crash_once, val);
        else if (strcmp(key, "crash_login_once") == 0) copy(crash_login_once, sizeof crash_login_once, val);
    }

    if (present != st.present) {
        if (!present)
            remove_token();
        st.present = present;
        st.event_pending = 1;
    }
    copy(st.serial, sizeof st.serial, serial);
    copy(st.crash_once, sizeof st.crash_once, crash_once);
    copy(st.crash_login_once, sizeof st.crash_login_once, crash_login_once);
    st.latency_ms = latency;
    char key[128];
    snprintf(key, sizeof key, "%s/%s/%s", pin, pin_max, pin_arm);
    if (strcmp(key, st.raw_pin) != 0) {
        copy(st.raw_pin, sizeof st.raw_pin, key);
        st.pin_left = *pin ? atol(pin) : -1;
        st.pin_max = !*pin ? -1 : *pin_max ? atol(pin_max) : st.pin_left > 3 ? st.pin_left : 3;
        st.pin_failed = st.pin_left < st.pin_max;
    }
    snprintf(key, sizeof key, "%s/%s/%s", fail, fail_count, fail_arm);
    if (strcmp(key, st.raw_fail) != 0) {
        copy(st.raw_fail, sizeof st.raw_fail, key);
        st.fail_rv = *fail ? parse_rv(fail) : CKR_OK;
        st.fail_left = !*fail ? 0 : *fail_count ? atol(fail_count) : 1;
    }
    pthread_mutex_unlock(&mu);
}

static int is_present(void)
{
    refresh();
    pthread_mutex_lock(&mu);
    int p = st.present;
    pthread_mutex_unlock(&mu);
    return p;
}

/* Abort the process if path (non-empty) can be created: one crash per path, across processes. Under mu. */
static void crash_once(const char *path, const char *name)
{
    if (!path[0])
        return;
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0600);
    if (fd < 0)
        return;
    logged(name, CKR_GENERAL_ERROR, "crash");
    abort();
}

/* ------------------------------------------------------------------ plain forwarding */

/* Calls on a session: CKR_DEVICE_REMOVED while the token is out. */
#define SESSION_FN(X)                                                                              \
    X(C_CloseSession, (CK_SESSION_HANDLE h), (h))                                                  \
    X(C_GetSessionInfo, (CK_SESSION_HANDLE h, CK_SESSION_INFO_PTR a), (h, a))                      \
    X(C_GetOperationState, (CK_SESSION_HANDLE h, CK_BYTE_PTR a, CK_ULONG_PTR b), (h, a, b))        \
    X(C_SetOperationState, (CK_SESSION_HANDLE h, CK_BYTE_PTR a, CK_ULONG b, CK_OBJECT_HANDLE c,    \
                            CK_OBJECT_HANDLE d), (h, a, b, c, d))                                  \
    X(C_InitPIN, (CK_SESSION_HANDLE h, CK_UTF8CHAR_PTR a, CK_ULONG b), (h, a, b))                  \
    X(C_SetPIN, (CK_SESSION_HANDLE h, CK_UTF8CHAR_PTR a, CK_ULONG b, CK_UTF8CHAR_PTR c,            \
                 CK_ULONG d), (h, a, b, c, d))                                                     \
    X(C_Logout, (CK_SESSION_HANDLE h), (h))                                                        \
    X(C_CreateObject, (CK_SESSION_HANDLE h, CK_ATTRIBUTE_PTR a, CK_ULONG b,                        \
                       CK_OBJECT_HANDLE_PTR c), (h, a, b, c))                                      \
    X(C_CopyObject, (CK_SESSION_HANDLE h, CK_OBJECT_HANDLE a, CK_ATTRIBUTE_PTR b, CK_ULONG c,      \
                     CK_OBJECT_HANDLE_PTR d), (h, a, b, c, d))                                     \
    X(C_DestroyObject, (CK_SESSION_HANDLE h, CK_OBJECT_HANDLE a), (h, a))                          \
    X(C_GetObjectSize, (CK_SESSION_HANDLE h, CK_OBJECT_HANDLE a, CK_ULONG_PTR b), (h, a, b))       \
    X(C_GetAttributeValue, (CK_SESSION_HANDLE h, CK_OBJECT_HANDLE a, CK_ATTRIBUTE_PTR b,           \
                            CK_ULONG c), (h, a, b, c))                                             \
    X(C_SetAttributeValue, (CK_SESSION_HANDLE h, CK_OBJECT_HANDLE a, CK_ATTRIBUTE_PTR b,           \
                            CK_ULONG c), (h, a, b, c))                                             \
    X(C_FindObjectsInit, (CK_SESSION_HANDLE h, CK_ATTRIBUTE_PTR a, CK_ULONG b), (h, a, b))         \
    X(C_FindObjects, (CK_SESSION_HANDLE h, CK_OBJECT_HANDLE_PTR a, CK_ULONG b, CK_ULONG_PTR c),    \
      (h, a, b, c))                                                                                \
    X(C_FindObjectsFinal, (CK_SESSION_HANDLE h), (h))                                              \
    X(C_EncryptInit, (CK_SESSION_HANDLE h, CK_MECHANISM_PTR a, CK_OBJECT_HANDLE b), (h, a, b))     \
    X(C_Encrypt, (CK_SESSION_HANDLE h, CK_BYTE_PTR a, CK_ULONG b, CK_BYTE_PTR c, CK_ULONG_PTR d),  \
      (h, a, b, c, d))                                                                             \
    X(C_EncryptUpdate, (CK_SESSION_HANDLE h, CK_BYTE_PTR a, CK_ULONG b, CK_BYTE_PTR c,             \
                        CK_ULONG_PTR d), (h, a, b, c, d))                                          \
    X(C_EncryptFinal, (CK_SESSION_HANDLE h, CK_BYTE_PTR a, CK_ULONG_PTR b), (h, a, b))             \
    X(C_DecryptInit, (CK_SESSION_HANDLE h, CK_MECHANISM_PTR a, CK_OBJECT_HANDLE b), (h, a, b))     \
    X(C_DecryptUpdate, (CK_SESSION_HANDLE h, CK_BYTE_PTR a, CK_ULONG b, CK_BYTE_PTR c,             \
                        CK_ULONG_PTR d), (h, a, b, c, d))                                          \
    X(C_DecryptFinal, (CK_SESSION_HANDLE h, CK_BYTE_PTR a, CK_ULONG_PTR b), (h, a, b))             \
    X(C_DigestInit, (CK_SESSION_HANDLE h, CK_MECHANISM_PTR a), (h, a))                             \
    X(C_Digest, (CK_SESSION_HANDLE h, CK_BYTE_PTR a, CK_ULONG b, CK_BYTE_PTR c, CK_ULONG_PTR d),   \
      (h, a, b, c, d))                                                                             \
    X(C_DigestUpdate, (CK_SESSION_HANDLE h, CK_BYTE_PTR a, CK_ULONG b), (h, a, b))                 \
    X(C_DigestKey, (CK_SESSION_HANDLE h, CK_OBJECT_HANDLE a), (h, a))                              \
    X(C_DigestFinal, (CK_SESSION_HANDLE h, CK_BYTE_PTR a, CK_ULONG_PTR b), (h, a, b))              \
    X(C_SignInit, (CK_SESSION_HANDLE h, CK_MECHANISM_PTR a, CK_OBJECT_HANDLE b), (h, a, b))        \
    X(C_SignUpdate, (CK_SESSION_HANDLE h, CK_BYTE_PTR a, CK_ULONG b), (h, a, b))                   \
    X(C_SignFinal, (CK_SESSION_HANDLE h, CK_BYTE_PTR a, CK_ULONG_PTR b), (h, a, b))                \
    X(C_SignRecoverInit, (CK_SESSION_HANDLE h, CK_MECHANISM_PTR a, CK_OBJECT_HANDLE b), (h, a, b)) \
    X(C_SignRecover, (CK_SESSION_HANDLE h, CK_BYTE_PTR a, CK_ULONG b, CK_BYTE_PTR c,               \
                      CK_ULONG_PTR d), (h, a, b, c, d))                                            \
    X(C_VerifyInit, (CK_SESSION_HANDLE h, CK_MECHANISM_PTR a, CK_OBJECT_HANDLE b), (h, a, b))      \
    X(C_Verify, (CK_SESSION_HANDLE h, CK_BYTE_PTR a, CK_ULONG b, CK_BYTE_PTR c, CK_ULONG d),       \
      (h, a, b, c, d))                                                                             \
    X(C_VerifyUpdate, (CK_SESSION_HANDLE h, CK_BYTE_PTR a, CK_ULONG b), (h, a, b))                 \
    X(C_VerifyFinal, (CK_SESSION_HANDLE h, CK_BYTE_PTR a, CK_ULONG b), (h, a, b))                  \
    X(C_VerifyRecoverInit, (CK_SESSION_HANDLE h, CK_MECHANISM_PTR a, CK_OBJECT_HANDLE b),          \
      (h, a, b))                                                                                   \
    X(C_VerifyRecover, (CK_SESSION_HANDLE h, CK_BYTE_PTR a, CK_ULONG b, CK_BYTE_PTR c,             \
                        CK_ULONG_PTR d), (h, a, b, c, d))                                          \
    X(C_DigestEncryptUpdate, (CK_SESSION_HANDLE h, CK_BYTE_PTR a, CK_ULONG b, CK_BYTE_PTR c,       \
                              CK_ULONG_PTR d), (h, a, b, c, d))                                    \
    X(C_DecryptDigestUpdate, (CK_SESSION_HANDLE h, CK_BYTE_PTR a, CK_ULONG b, CK_BYTE_PTR c,       \
                              CK_ULONG_PTR d), (h, a, b, c, d))                                    \
    X(C_SignEncryptUpdate, (CK_SESSION_HANDLE h, CK_BYTE_PTR a, CK_ULONG b, CK_BYTE_PTR c,         \
                            CK_ULONG_PTR d), (h, a, b, c, d))                                      \
    X(C_DecryptVerifyUpdate, (CK_SESSION_HANDLE h, CK_BYTE_PTR a, CK_ULONG b, CK_BYTE_PTR c,       \
                              CK_ULONG_PTR d), (h, a, b, c, d))                                    \
    X(C_GenerateKey, (CK_SESSION_HANDLE h, CK_MECHANISM_PTR a, CK_ATTRIBUTE_PTR b, CK_ULONG c,     \
                      CK_OBJECT_HANDLE_PTR d), (h, a, b, c, d))                                    \
    X(C_GenerateKeyPair, (CK_SESSION_HANDLE h, CK_MECHANISM_PTR a, CK_ATTRIBUTE_PTR b, CK_ULONG c, \
                          CK_ATTRIBUTE_PTR d, CK_ULONG e, CK_OBJECT_HANDLE_PTR f,                  \
                          CK_OBJECT_HANDLE_PTR g), (h, a, b, c, d, e, f, g))                       \
    X(C_WrapKey, (CK_SESSION_HANDLE h, CK_MECHANISM_PTR a, CK_OBJECT_HANDLE b, CK_OBJECT_HANDLE c, \
                  CK_BYTE_PTR d, CK_ULONG_PTR e), (h, a, b, c, d, e))                              \
    X(C_UnwrapKey, (CK_SESSION_HANDLE h, CK_MECHANISM_PTR a, CK_OBJECT_HANDLE b, CK_BYTE_PTR c,    \
                    CK_ULONG d, CK_ATTRIBUTE_PTR e, CK_ULONG f, CK_OBJECT_HANDLE_PTR g),           \
      (h, a, b, c, d, e, f, g))                                                                    \
    X(C_DeriveKey, (CK_SESSION_HANDLE h, CK_MECHANISM_PTR a, CK_OBJECT_HANDLE b,                   \
                    CK_ATTRIBUTE_PTR c, CK_ULONG d, CK_OBJECT_HANDLE_PTR e), (h, a, b, c, d, e))   \
    X(C_SeedRandom, (CK_SESSION_HANDLE h, CK_BYTE_PTR a, CK_ULONG b), (h, a, b))                   \
    X(C_GenerateRandom, (CK_SESSION_HANDLE h, CK_BYTE_PTR a, CK_ULONG b), (h, a, b))               \
    X(C_GetFunctionStatus, (CK_SESSION_HANDLE h), (h))                                             \
    X(C_CancelFunction, (CK_SESSION_HANDLE h), (h))

/* Calls on a slot's token: CKR_TOKEN_NOT_PRESENT while it is out. */
#define TOKEN_FN(X)                                                                                \
    X(C_GetMechanismList, (CK_SLOT_ID s, CK_MECHANISM_TYPE_PTR a, CK_ULONG_PTR b), (s, a, b))      \
    X(C_GetMechanismInfo, (CK_SLOT_ID s, CK_MECHANISM_TYPE a, CK_MECHANISM_INFO_PTR b), (s, a, b)) \
    X(C_InitToken, (CK_SLOT_ID s, CK_UTF8CHAR_PTR a, CK_ULONG b, CK_UTF8CHAR_PTR c), (s, a, b, c)) \
    X(C_OpenSession, (CK_SLOT_ID s, CK_FLAGS a, CK_VOID_PTR b, CK_NOTIFY c,                        \
                      CK_SESSION_HANDLE_PTR d), (s, a, b, c, d))

#define DEFINE_GATED(name, params, args, absent_rv)                                                \
    static CK_RV w_##name params                                                                   \
    {                                                                                              \
        if (!is_present())                                                                         \
            return logged(#name, absent_rv, NULL);                                                 \
        return logged(#name, real->name args, NULL);                                               \
    }
#define DEFINE_SESSION_FN(name, params, args) DEFINE_GATED(name, params, args, CKR_DEVICE_REMOVED)
#define DEFINE_TOKEN_FN(name, params, args) DEFINE_GATED(name, params, args, CKR_TOKEN_NOT_PRESENT)
SESSION_FN(DEFINE_SESSION_FN)
TOKEN_FN(DEFINE_TOKEN_FN)

/* ------------------------------------------------------------------ library and slots */

static CK_RV w_C_Initialize(CK_VOID_PTR args)
{
    CK_RV rv = real->C_Initialize(args);
    if (rv == CKR_OK) {
        pthread_mutex_lock(&mu);
        initialized = 1;
        pthread_mutex_unlock(&mu);
    }
    refresh();
    return logged("C_Initialize", rv, NULL);
}

static CK_RV w_C_Finalize(CK_VOID_PTR reserved)
{
    pthread_mutex_lock(&mu);
    initialized = 0;
    pthread_mutex_unlock(&mu);
    return logged("C_Finalize", real->C_Finalize(reserved), NULL);
}

static CK_RV w_C_GetInfo(CK_INFO_PTR info)
{
    return logged("C_GetInfo", real->C_GetInfo(info), NULL);
}

static CK_RV w_C_GetSlotList(CK_BBOOL token_present, CK_SLOT_ID_PTR list, CK_ULONG_PTR count)
{
    if (token_present && !is_present() && count != NULL) {
        *count = 0;  /* every token is out of its reader */
        return logged("C_GetSlotList", CKR_OK, NULL);
    }
    return logged("C_GetSlotList", real->C_GetSlotList(token_present, list, count), NULL);
}

static CK_RV w_C_GetSlotInfo(CK_SLOT_ID slot, CK_SLOT_INFO_PTR info)
{
    int present = is_present();
    CK_RV rv = real->C_GetSlotInfo(slot, info);
    if (rv == CKR_OK) {
        info->flags |= CKF_REMOVABLE_DEVICE;  /* a card reader */
        if (!present)
            info->flags &= ~CKF_TOKEN_PRESENT;
    }
    return logged("C_GetSlotInfo", rv, NULL);
}

static CK_RV w_C_GetTokenInfo(CK_SLOT_ID slot, CK_TOKEN_INFO_PTR info)
{
    if (!is_present())
        return logged("C_GetTokenInfo", CKR_TOKEN_NOT_PRESENT, NULL);
    CK_RV rv = real->C_GetTokenInfo(slot, info);
    if (rv != CKR_OK)
        return logged("C_GetTokenInfo", rv, NULL);
    pthread_mutex_lock(&mu);
    if (st.serial[0]) {
        memset(info->serialNumber, ' ', sizeof info->serialNumber);
        memcpy(info->serialNumber, st.serial, strlen(st.serial));
    }
    if (st.pin_max >= 0) {
        info->flags &= ~(CKF_USER_PIN_COUNT_LOW | CKF_USER_PIN_FINAL_TRY | CKF_USER_PIN_LOCKED);
        if (st.pin_left <= 0)
            info->flags |= CKF_USER_PIN_LOCKED;
        else if (st.pin_left == 1)
            info->flags |= CKF_USER_PIN_FINAL_TRY;
        if (st.pin_failed && st.pin_left > 0)
            info->flags |= CKF_USER_PIN_COUNT_LOW;
    }
    pthread_mutex_unlock(&mu);
    return logged("C_GetTokenInfo", rv, NULL);
}

static CK_RV w_C_CloseAllSessions(CK_SLOT_ID slot)
{
    refresh();  /* harmless after a removal: the sessions are already closed */
    return logged("C_CloseAllSessions", real->C_CloseAllSessions(slot), NULL);
}

/* Slot events are the present=0/1 changes; SoftHSM has none of its own. */
static CK_RV w_C_WaitForSlotEvent(CK_FLAGS flags, CK_SLOT_ID_PTR slot, CK_VOID_PTR reserved)
{
    (void)reserved;
    for (;;) {
        refresh();
        pthread_mutex_lock(&mu);
        int pending = st.event_pending, up = initialized;
        if (pending) {
            st.event_pending = 0;
            *slot = st.event_slot;
        }
        pthread_mutex_unlock(&mu);
        if (pending)
            return logged("C_WaitForSlotEvent", CKR_OK, NULL);
        if (!up)
            return logged("C_WaitForSlotEvent", CKR_CRYPTOKI_NOT_INITIALIZED, NULL);
        if (flags & CKF_DONT_BLOCK)
            return logged("C_WaitForSlotEvent", CKR_NO_EVENT, NULL);
        usleep(50 * 1000);
    }
}

/* ------------------------------------------------------------------ PIN retry counter */

/* With pin_retries set: a wrong user PIN costs one try, a good one restores them all;
 * with no try left C_Login answers CKR_PIN_LOCKED without asking the real module. */
static CK_RV w_C_Login(CK_SESSION_HANDLE h, CK_USER_TYPE user, CK_UTF8CHAR_PTR pin, CK_ULONG len)
{
    if (!is_present())
        return logged("C_Login", CKR_DEVICE_REMOVED, NULL);
    pthread_mutex_lock(&mu);
    int counted = user == CKU_USER && st.pin_max >= 0;
    int locked = counted && st.pin_left <= 0;
    pthread_mutex_unlock(&mu);
    if (locked)
        return logged("C_Login", CKR_PIN_LOCKED, "injected");
    CK_RV rv = real->C_Login(h, user, pin, len);
    if (counted) {
        pthread_mutex_lock(&mu);
        if (rv == CKR_PIN_INCORRECT && st.pin_left > 0) {
            st.pin_left--;
            st.pin_failed = 1;
        } else if (rv == CKR_OK) {
            st.pin_left = st.pin_max;
            st.pin_failed = 0;
        }
        pthread_mutex_unlock(&mu);
    }
    pthread_mutex_lock(&mu);
    crash_once(st.crash_login_once, "C_Login");
    pthread_mutex_unlock(&mu);
    return logged("C_Login", rv, NULL);
}

/* ------------------------------------------------------------------ private-key operations */

typedef CK_RV (*one_shot_fn)(CK_SESSION_HANDLE, CK_BYTE_PTR, CK_ULONG, CK_BYTE_PTR, CK_ULONG_PTR);

/* C_Sign / C_Decrypt. A length query (out == NULL) is forwarded as is. A call that produces
 * output first sleeps latency_ms; an injected failure still lets the real call run (a failed
 * C_Sign ends the operation, so the session stays usable), then wipes its output. */
static CK_RV one_shot(const char *name, one_shot_fn fn, CK_SESSION_HANDLE h, CK_BYTE_PTR in,
                      CK_ULONG in_len, CK_BYTE_PTR out, CK_ULONG_PTR out_len)
{
    if (!is_present())
        return logged(name, CKR_DEVICE_REMOVED, NULL);
    if (out == NULL)
        return logged(name, fn(h, in, in_len, out, out_len), "query");
    pthread_mutex_lock(&mu);
    crash_once(st.crash_once, name);
    long latency = st.latency_ms;
    CK_RV fail = st.fail_left > 0 ? st.fail_rv : CKR_OK;
    if (fail != CKR_OK)
        st.fail_left--;
    pthread_mutex_unlock(&mu);
    if (latency > 0) {
        struct timespec ts = {latency / 1000, (latency % 1000) * 1000000L};
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {}
    }
    CK_ULONG capacity = out_len ? *out_len : 0;
    CK_RV rv = fn(h, in, in_len, out, out_len);
    if (fail == CKR_OK)
        return logged(name, rv, NULL);
    if (rv == CKR_BUFFER_TOO_SMALL) {  /* not an attempt: keep the fault for the next call */
        pthread_mutex_lock(&mu);
        st.fail_left++;
        pthread_mutex_unlock(&mu);
        return logged(name, rv, NULL);
    }
    memset(out, 0, capacity);
    if (out_len)
        *out_len = 0;
    return logged(name, fail, "injected");
}

static CK_RV w_C_Sign(CK_SESSION_HANDLE h, CK_BYTE_PTR in, CK_ULONG in_len, CK_BYTE_PTR out,
                      CK_ULONG_PTR out_len)
{
    return one_shot("C_Sign", real->C_Sign, h, in, in_len, out, out_len);
}

static CK_RV w_C_Decrypt(CK_SESSION_HANDLE h, CK_BYTE_PTR in, CK_ULONG in_len, CK_BYTE_PTR out,
                         CK_ULONG_PTR out_len)
{
    return one_shot("C_Decrypt", real->C_Decrypt, h, in, in_len, out, out_len);
}

/* ------------------------------------------------------------------ the table */

static CK_RV w_C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list);

#define ENTRY(name, params, args) .name = w_##name,
static CK_FUNCTION_LIST table = {
    .version = {2, 40},
    .C_Initialize = w_C_Initialize, .C_Finalize = w_C_Finalize, .C_GetInfo = w_C_GetInfo,
    .C_GetFunctionList = w_C_GetFunctionList, .C_GetSlotList = w_C_GetSlotList,
    .C_GetSlotInfo = w_C_GetSlotInfo, .C_GetTokenInfo = w_C_GetTokenInfo,
    .C_CloseAllSessions = w_C_CloseAllSessions, .C_WaitForSlotEvent = w_C_WaitForSlotEvent,
    .C_Login = w_C_Login, .C_Sign = w_C_Sign, .C_Decrypt = w_C_Decrypt,
    SESSION_FN(ENTRY) TOKEN_FN(ENTRY)
};

static CK_RV load_status = CKR_GENERAL_ERROR;

static void load(void)
{
    const char *path = getenv("FAULTY_P11_REAL");
    if (path == NULL || *path == '\0')
        path = "/usr/lib/softhsm/libsofthsm2.so";
    void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    CK_C_GetFunctionList get = lib ? (CK_C_GetFunctionList)dlsym(lib, "C_GetFunctionList") : NULL;
    if (get == NULL || get(&real) != CKR_OK || real == NULL) {
        fprintf(stderr, "faultyp11: cannot load the real module %s: %s\n", path, dlerror());
        return;
    }
    const char *ctl = getenv("FAULTY_P11_CONTROL");
    control_path = (ctl && *ctl) ? strdup(ctl) : NULL;  /* once per process */
    const char *log = getenv("FAULTY_P11_LOG");
    if (log && *log)
        log_fd = open(log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    load_status = CKR_OK;
}

static CK_RV w_C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, load);
    if (load_status != CKR_OK)
        return load_status;
    if (list == NULL)
        return CKR_ARGUMENTS_BAD;
    *list = &table;
    return CKR_OK;
}

EXPORT CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list)
{
    return w_C_GetFunctionList(list);
}
